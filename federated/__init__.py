"""Federated learning with Flower: ClientApp, ServerApp, partitioning, strategies, simulation."""
