"""All ops, registered once each (importing this package fills REGISTRY)."""
from . import attention, core, dropout, fused, grad, lora, loss, mla, moe, nn, optim, shape  # noqa: F401  (registration side effects)
from .registry import (CONTRACTION, ELEMENTWISE, REDUCTION, REGISTRY, SIDE_EFFECT, SOURCE, VIEW,
                       OpDef, get, infer_types, ops_with)

__all__ = ["REGISTRY", "OpDef", "get", "infer_types", "ops_with", "ELEMENTWISE", "REDUCTION",
           "CONTRACTION", "VIEW", "SIDE_EFFECT", "SOURCE"]
