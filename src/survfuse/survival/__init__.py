"""Survival losses, heads (registered in `survfuse.registry.HEADS`) and the linear Cox model."""
