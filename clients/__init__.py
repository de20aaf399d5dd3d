"""Flower ClientApp of fedistill (``clients.app:app``)."""
