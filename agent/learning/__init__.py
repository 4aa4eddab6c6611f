"""Federated learning on the agent: training backends, aggregation and server optimizers."""
