"""The reference backend's executor is the IR's own interpreter (reft/ir/interpret.py); this name
stays for the code that imports it from here."""
from ...ir.interpret import ReferenceExecutor, check_feed  # noqa: F401

__all__ = ["ReferenceExecutor", "check_feed"]
