"""Flower ClientApp handlers (the federated layer; filled by the federated-simulation issue)."""
