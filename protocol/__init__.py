"""The message protocol between fedistill's ServerApp and ClientApp, defined once.

:mod:`protocol.records` encodes tasks, tensors and metrics as Flower records and decodes
them; ``clients/`` and ``strategies/`` both import it and never each other.
"""
