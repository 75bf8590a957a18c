"""survfuse: multimodal (CT + EHR) time-to-event prediction with honest statistics."""

__version__ = "0.1.0"

__all__ = ["__version__"]
