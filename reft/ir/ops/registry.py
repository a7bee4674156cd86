"""The op registry: one declarative record per op.

Each `OpDef` holds everything the compiler knows about an op:
  infer   shape/dtype rule: (input types, attrs) -> output types; raises TypeError on misuse
  ref     numpy reference semantics: (input arrays, attrs) -> output arrays (the oracle)
  vjp     gradient rule for autodiff (filled in by the training work; None = not differentiable yet)
  quantized_input  the input that may carry a quantized weight matrix (verify, compiler, backends read it)
  aliases          output index -> input index whose buffer it reuses (memory planning)
  reference_only   no generated-code backend lowers the op, by design (tests check every other op is lowered)
  traits  op families the passes read (see TRAITS)
  attrs   required attribute names; `defaults` the optional ones with their default values
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..quantized import QTensor
from ..types import QUANT_DTYPES, TensorType

# op families, read by passes
ELEMENTWISE = "elementwise"   # output[i] depends only on inputs[i] (after broadcasting)
REDUCTION = "reduction"       # reduces along an axis (norms, softmax)
CONTRACTION = "contraction"   # matmul-like; reads weights
VIEW = "view"                 # reshapes/reorders data without arithmetic
SIDE_EFFECT = "side_effect"   # writes state outside its outputs (KV cache); never removed or merged
SOURCE = "source"             # graph inputs and weights
TRAITS = frozenset({ELEMENTWISE, REDUCTION, CONTRACTION, VIEW, SIDE_EFFECT, SOURCE})

InferFn = Callable[[list[TensorType], dict[str, Any]], list[TensorType]]
RefFn = Callable[[list[np.ndarray], dict[str, Any]], list[np.ndarray]]


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn
    ref: RefFn | None
    arity: tuple[int, int]                       # (min, max) number of inputs
    traits: frozenset[str] = frozenset()
    attrs: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    vjp: Callable | None = None
    doc: str = ""
    quantized_input: int | None = None           # the input that may carry a (quantized) weight matrix
    aliases: dict[int, int] = field(default_factory=dict)   # output index -> input whose buffer it reuses
    reference_only: bool = False                 # no generated-code backend lowers it (by design)

    def full_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return {**self.defaults, **attrs}


REGISTRY: dict[str, OpDef] = {}


def op(name: str, *, infer: InferFn, ref: RefFn | None, arity, traits=(), attrs=(),
       defaults=None, doc: str = "", vjp: Callable | None = None, quantized_input: int | None = None,
       aliases: dict[int, int] | None = None, reference_only: bool = False) -> OpDef:
    """Register an op once; every fact about it is given here."""
    if name in REGISTRY:
        raise ValueError(f"op {name} registered twice")
    bad = set(traits) - TRAITS
    if bad:
        raise ValueError(f"unknown traits {bad}")
    ar = (arity, arity) if isinstance(arity, int) else tuple(arity)
    d = OpDef(name, infer, ref, ar, frozenset(traits), tuple(attrs), dict(defaults or {}), vjp, doc,
              quantized_input, dict(aliases or {}), reference_only)
    REGISTRY[name] = d
    return d


def get(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None


def ops_with(trait: str) -> frozenset[str]:
    return frozenset(n for n, d in REGISTRY.items() if trait in d.traits)


def infer_types(op: str, in_types: list[TensorType], attrs: dict[str, Any]) -> list[TensorType]:
    d = get(op)
    lo, hi = d.arity
    if not lo <= len(in_types) <= hi:
        raise TypeError(f"{op}: takes {lo}..{hi} inputs, got {len(in_types)}")
    missing = [a for a in d.attrs if a not in attrs]
    if missing:
        raise TypeError(f"{op}: missing attributes {missing}")
    unknown = set(attrs) - set(d.attrs) - set(d.defaults)
    if unknown:
        raise TypeError(f"{op}: unknown attributes {sorted(unknown)}")
    return d.infer(in_types, d.full_attrs(attrs))


# -- helpers shared by the op files ------------------------------------------------

def f32(a: np.ndarray) -> np.ndarray:
    """Reference compute happens in float32 (quantized weights are dequantized)."""
    if isinstance(a, QTensor):
        return a.dequantize()
    return a if a.dtype == np.float32 else a.astype(np.float32)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise TypeError(msg)


def is_float(t: TensorType) -> bool:
    return t.dtype in ("float32", "float16", "bfloat16")


def is_weight(t: TensorType) -> bool:
    """A weight matrix operand: float, or quantized (only weight-reading ops accept those)."""
    return is_float(t) or t.dtype in QUANT_DTYPES


def quantized_weight_inputs() -> dict[str, int]:
    """op -> index of the input that may be a quantized weight (verify rejects quantized values
    elsewhere); read from each OpDef's `quantized_input`."""
    return {n: d.quantized_input for n, d in REGISTRY.items() if d.quantized_input is not None}


def aliases(op: str) -> dict[int, int]:
    """Output index -> input index whose buffer the output reuses (views, in-place writes)."""
    return get(op).aliases





def broadcast_shapes(op: str, a, b):
    """numpy broadcasting over symbolic dims (a symbol only matches itself or 1)."""
    out = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise TypeError(f"{op}: shapes {tuple(a)} and {tuple(b)} do not broadcast")
    return tuple(reversed(out))
