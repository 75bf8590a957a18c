"""Fusion strategies (registered in `survfuse.registry.FUSIONS`) and their estimator."""
