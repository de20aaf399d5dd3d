"""Deprecated alias of :mod:`protocol.records` (the message protocol now lives in ``protocol/``).

Kept only until :mod:`strategies.base` and :mod:`strategies.distill` import
:mod:`protocol.records` directly; new code imports :mod:`protocol.records`.
"""

from protocol.records import *  # noqa: F403
from protocol.records import __all__  # noqa: F401
