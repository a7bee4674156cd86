"""reft: an LLM compiler and runtime."""
__version__ = "0.1.0"
