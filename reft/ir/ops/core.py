"""Sources (graph inputs, weights) and elementwise ops."""
from __future__ import annotations

import math

import numpy as np

from ..types import DTYPES, FLOAT_DTYPES, TensorType, np_dtype
from .autodiff import f32 as to_f32
from .autodiff import unbroadcast
from .registry import ELEMENTWISE, SOURCE, broadcast_shapes, check, f32, is_float, op

# -- sources: their output type is declared on the node; the executor supplies the data.
op("input", infer=None, ref=None, arity=0, traits={SOURCE}, attrs=("name",),
   doc="A runtime-fed graph input, named by `name`.")
op("param", infer=None, ref=None, arity=0, traits={SOURCE}, attrs=("name",),
   doc="A weight, named by `name` as in the checkpoint (or as a weight transform named it).")


# -- binary elementwise (numpy broadcasting, float32 compute, result in the first input's dtype)
def _binary_infer(name):
    def infer(ts, a):
        x, y = ts
        check(is_float(x) and is_float(y), f"{name}: float inputs required, got {x.dtype}, {y.dtype}")
        return [TensorType(broadcast_shapes(name, x.shape, y.shape), x.dtype)]
    return infer


def _binary_ref(fn):
    def ref(xs, a):
        x, y = xs
        return [fn(f32(x), f32(y)).astype(x.dtype)]
    return ref


def _add_vjp(b, node, cts, wants):
    return [unbroadcast(b, cts[0], v.type) if w else None for v, w in zip(node.inputs, wants)]


def _mul_vjp(b, node, cts, wants):
    x, y = node.inputs
    g = to_f32(b, cts[0])
    return [unbroadcast(b, b.mul(g, to_f32(b, y)), x.type) if wants[0] else None,
            unbroadcast(b, b.mul(g, to_f32(b, x)), y.type) if wants[1] else None]


op("add", infer=_binary_infer("add"), ref=_binary_ref(np.add), vjp=_add_vjp, arity=2, traits={ELEMENTWISE},
   doc="x + y")
op("mul", infer=_binary_infer("mul"), ref=_binary_ref(np.multiply), vjp=_mul_vjp, arity=2, traits={ELEMENTWISE},
   doc="x * y")


# -- unary elementwise
def _unary_infer(name):
    def infer(ts, a):
        check(is_float(ts[0]), f"{name}: float input required, got {ts[0].dtype}")
        return [ts[0]]
    return infer


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _act_vjp(grad_op):
    def vjp(b, node, cts, wants):
        x = node.inputs[0]
        g = b.emit(grad_op, to_f32(b, cts[0]), to_f32(b, x))
        return [g if x.dtype == "float32" else b.cast(g, dtype=x.dtype)]
    return vjp


op("silu", infer=_unary_infer("silu"), ref=lambda xs, a: [_silu(f32(xs[0])).astype(xs[0].dtype)],
   vjp=_act_vjp("silu_grad"), arity=1, traits={ELEMENTWISE}, doc="x * sigmoid(x)")
op("gelu_tanh", infer=_unary_infer("gelu_tanh"),
   ref=lambda xs, a: [_gelu_tanh(f32(xs[0])).astype(xs[0].dtype)], vjp=_act_vjp("gelu_tanh_grad"),
   arity=1, traits={ELEMENTWISE}, doc="GELU, tanh approximation (HF 'gelu_pytorch_tanh')")


def _scale_vjp(b, node, cts, wants):
    x = node.inputs[0]
    g = b.scale(to_f32(b, cts[0]), factor=node.attrs["factor"])
    return [g if x.dtype == "float32" else b.cast(g, dtype=x.dtype)]


op("scale", infer=_unary_infer("scale"), ref=lambda xs, a: [(f32(xs[0]) * np.float32(a["factor"])).astype(xs[0].dtype)],
   vjp=_scale_vjp, arity=1, traits={ELEMENTWISE}, attrs=("factor",),
   doc="x * factor, a float32 constant (Gemma's embedding scale sqrt(hidden)).")


def softcap(x, cap):
    """cap * tanh(x / cap) in float32, in transformers' order (divide, tanh, multiply)."""
    c = np.float32(cap)
    return np.tanh(x / c) * c


def _softcap_vjp(b, node, cts, wants):
    x = node.inputs[0]
    g = b.softcap_grad(to_f32(b, cts[0]), to_f32(b, x), cap=node.attrs["cap"])
    return [g if x.dtype == "float32" else b.cast(g, dtype=x.dtype)]


op("softcap", infer=_unary_infer("softcap"), ref=lambda xs, a: [softcap(f32(xs[0]), a["cap"]).astype(xs[0].dtype)],
   vjp=_softcap_vjp, arity=1, traits={ELEMENTWISE}, attrs=("cap",),
   doc="Soft-capping cap * tanh(x / cap) (Gemma 2's final logits).")


def _cast_infer(ts, a):
    check(a["dtype"] in DTYPES, f"cast: unknown dtype {a['dtype']!r}")
    return [TensorType(ts[0].shape, a["dtype"])]


def _cast_vjp(b, node, cts, wants):
    x = node.inputs[0]
    return [b.cast(cts[0], dtype=x.dtype) if x.dtype in FLOAT_DTYPES else None]


op("cast", infer=_cast_infer, ref=lambda xs, a: [xs[0].astype(np_dtype(a["dtype"]))], vjp=_cast_vjp,
   arity=1, traits={ELEMENTWISE}, attrs=("dtype",), doc="Convert to `dtype` (round to nearest).")
