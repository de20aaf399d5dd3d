"""Flower ServerApp and server strategies of fedistill (``strategies.app:app``).

Strategies register by name (``strategy=feddm``) in :data:`strategies.base.STRATEGIES`;
importing :mod:`strategies.app` registers the built-in ones.
"""
