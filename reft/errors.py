"""User-facing errors: each carries one line that names the problem.

The CLIs print `error: <message>` and exit non-zero for these; anything else is a bug.
"""


class ReftError(Exception):
    """Bad input or an unsupported request, explained in one line."""


class ModelError(ReftError):
    """Missing, corrupt or unsupported model files."""


class PlanError(ReftError):
    """Missing, corrupt or incompatible plan directory."""


class RequestError(ReftError):
    """A generation request that cannot be served (e.g. prompt longer than the context)."""
