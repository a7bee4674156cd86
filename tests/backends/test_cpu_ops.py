"""Every op on the cpu backend against the numpy reference (hypothesis over shapes, dtypes,
attributes). Each example compiles one graph holding a few independent cases of the op."""
from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from strategies import OP_CASES, input_types

from reft.backends.cpu import compile_graph
from reft.backends.cpu.lower import PACKED_READERS, Unsupported
from reft.backends.reference import ReferenceExecutor
from reft.ir import Graph, GraphBuilder, ops

# ops whose cpu kernels take float32 activations only (weights may be any float dtype)
F32_ACTIVATIONS = {"linear": [0], "linear_glu": [0], "qkv_rope": [0], "add_rms_norm": [0, 1],
                   "kv_cache_write": [2, 3], "paged_attention": [0]}


def as_f32(op, xs):
    xs = list(xs)
    for i in F32_ACTIVATIONS.get(op, []):
        xs[i] = xs[i].astype(np.float32)
    if op == "linear" and len(xs) == 3:
        xs[2] = xs[2].astype(np.float32)
    if op in ("linear_glu", "qkv_rope") and len(xs) > 2:   # biases and norm weights are float32 in plans
        xs = [x.astype(np.float32) if i >= 2 and x.dtype.kind == "f" else x for i, x in enumerate(xs)]
    if op in ("kv_cache_write", "paged_attention"):
        ix = [i for i, x in enumerate(xs) if x.dtype.kind == "i"]
        xs = [x.astype(xs[ix[0]].dtype) if i in ix[:2] else x for i, x in enumerate(xs)]  # pos/sid share a dtype
    return xs


def uses_uint8(xs, attrs) -> bool:
    return any(x.dtype == np.uint8 for x in xs) or attrs.get("dtype") == "uint8"


def build(cases) -> tuple[Graph, dict, dict]:
    """One graph with every case as independent nodes over their own inputs; weight matrices of
    matmul-like ops are graph weights (the cpu backend stores those packed)."""
    b = GraphBuilder("forward")
    feeds, weights = {}, {}
    for c, (op, xs, attrs) in enumerate(cases):
        vals = []
        for i, (x, t) in enumerate(zip(xs, input_types(xs))):
            name = f"c{c}_in{i}"
            if PACKED_READERS.get(op) == i and x.ndim == 2:
                weights[name] = x.copy()
                vals.append(b.param(name, t.shape, t.dtype))
                continue
            feeds[name] = x.copy()
            vals.append(b.input(name, t.shape, t.dtype))
        outs = b.emit(op, *vals, **attrs)
        for j, o in enumerate(outs if isinstance(outs, list) else [outs]):
            b.output(f"c{c}_out{j}", o)
    return b.graph, feeds, weights


def tolerance(dtype):
    return {"float32": 2e-4, "float16": 4e-3, "bfloat16": 3e-2}.get(str(dtype), 0)


@pytest.mark.parametrize("op", sorted(OP_CASES))
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_cpu_op_matches_reference(op, data):
    cases = [data.draw(OP_CASES[op]) for _ in range(data.draw(st.integers(1, 3)))]
    cases = [(o, as_f32(o, xs), a) for o, xs, a in cases if not uses_uint8(xs, a)]   # no uint8 kernels
    if not cases:
        reject()
    graph, feeds, weights = build(cases)
    if not graph.outputs:
        reject()
    want = ReferenceExecutor(graph, weights).run({k: v.copy() for k, v in feeds.items()})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = compile_graph(graph, weights, tmp, max_tokens=64, threads=2)
        except Unsupported:
            reject()
        got = exe.run({k: v.copy() for k, v in feeds.items()})
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape and g.dtype == w.dtype, k
        tol = tolerance(w.dtype)
        if tol:
            np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=tol, atol=tol, err_msg=k)
        else:
            np.testing.assert_array_equal(g, w, err_msg=k)


def test_every_op_lowers_at_float32():
    """No registered op is left without a cpu kernel."""
    from reft.backends.cpu.lower import Lowering

    missing = [op for op in ops.REGISTRY if op not in ("input", "param", "reshape")
               and not hasattr(Lowering, f"op_{op}")]
    assert not missing
