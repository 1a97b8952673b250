"""mace: an LLM server that keeps fine-tuning its model on its users' data while it serves."""

__version__ = "0.1.0"
