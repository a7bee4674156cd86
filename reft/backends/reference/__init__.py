from .executor import ReferenceExecutor

__all__ = ["ReferenceExecutor"]
