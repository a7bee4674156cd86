"""The compile pipeline, in one place, in phases. `reftc compile --dump DIR` writes the IR
after each of these as NNN_<name>.ir."""
from __future__ import annotations

from .cast_weights import cast_weights
from .eliminate_common_subexpressions import eliminate_common_subexpressions
from .eliminate_dead_code import eliminate_dead_code
from .fuse_projections import fuse_projections
from .lower_paged_attention import lower_paged_attention
from .manager import PassFn

PIPELINE: list[tuple[str, PassFn]] = [
    # -- clean-up of the traced model
    ("eliminate_dead_code", eliminate_dead_code),
    ("eliminate_common_subexpressions", eliminate_common_subexpressions),
    # -- compile-time weight transforms
    ("fuse_projections", fuse_projections),
    ("eliminate_dead_code", eliminate_dead_code),   # drops the weights the fusion replaced
    ("cast_weights", cast_weights),
    # -- KV cache: attention reads and writes pages owned by the runtime
    ("lower_paged_attention", lower_paged_attention),
]
