"""Flower ServerApp and strategies (the federated layer; filled by the federated-simulation issue)."""
