"""Every op on the cpu backend against the numpy reference (hypothesis over shapes, dtypes,
attributes). Each example compiles one graph holding a few independent cases of the op."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from strategies import AWAITING_CPU_KERNELS, OP_CASES, input_types, matmul_cases

from reft.backends.cpu import compile_graph
from reft.backends.cpu.lower import PACKED_READERS, Unsupported
from reft.backends.cpu.targets import TARGETS, host_target, runs_here
from reft.backends.reference import ReferenceExecutor
from reft.ir import Graph, GraphBuilder, ops
from reft.ir.types import np_dtype

# ops whose cpu kernels take float32 activations only (weights may be any float dtype)
F32_ACTIVATIONS = {"linear": [0], "linear_glu": [0], "qkv_rope": [0], "add_rms_norm": [0, 1],
                   "kv_cache_write": [2, 3], "paged_attention": [0]}


def as_f32(op, xs):
    xs = list(xs)
    for i in F32_ACTIVATIONS.get(op, []):
        xs[i] = xs[i].astype(np.float32)
    if op == "linear" and len(xs) == 3:
        xs[2] = xs[2].astype(np.float32)
    if op in ("linear_glu", "qkv_rope") and len(xs) > 2:   # biases, norm weights (bf16: kind "V") are f32 in plans
        xs = [x.astype(np.float32) if i >= 2 and x.dtype.kind not in "iu" else x for i, x in enumerate(xs)]
    if op == "causal_attention":   # q, k, v of one dtype; pos, sid of one dtype; sinks float32
        xs = [x.astype(xs[0].dtype) for x in xs[:3]] + [x.astype(xs[3].dtype) for x in xs[3:5]] + xs[5:]
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
            if PACKED_READERS.get(op) == i and x.ndim in (2, 3):   # matrices, stacks of experts
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


def check_against_reference(cases, target=None, compile=compile_graph):
    """Compile the cases' graph (2 threads, by `compile`: compile_graph or alike) and compare every
    output with the reference."""
    graph, feeds, weights = build(cases)
    if not graph.outputs:
        reject()
    want = ReferenceExecutor(graph, weights).run({k: v.copy() for k, v in feeds.items()})
    with tempfile.TemporaryDirectory() as tmp:
        try:
            exe = compile(graph, weights, tmp, max_tokens=80, threads=2, target=target)
        except Unsupported:
            reject()
        got = exe.run({k: v.copy() for k, v in feeds.items()})
    for k, w in want.items():
        g = got[k]
        what = f"{k} ({cases[int(k[1:].split('_')[0])][0]})"    # c<case>_out<j> (op)
        assert g.shape == w.shape and g.dtype == w.dtype, what
        tol = tolerance(w.dtype)
        if tol:
            np.testing.assert_allclose(g.astype(np.float32), w.astype(np.float32), rtol=tol, atol=tol, err_msg=what)
        else:
            np.testing.assert_array_equal(g, w, err_msg=what)


LOWERED_CASES = sorted(set(OP_CASES) - AWAITING_CPU_KERNELS)   # backward ops without kernels yet are skipped


@pytest.mark.parametrize("op", LOWERED_CASES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_cpu_op_matches_reference(op, data):
    cases = [data.draw(OP_CASES[op]) for _ in range(data.draw(st.integers(1, 3)))]
    cases = [(o, as_f32(o, xs), a) for o, xs, a in cases if not uses_uint8(xs, a)]   # no uint8 kernels
    if not cases:
        reject()
    check_against_reference(cases)


# the cpu targets this host can run (the host's own, and every narrower one)
LOCAL_TARGETS = [t for t in TARGETS if runs_here(t)]
# token counts at the edges of the dense matmul paths (linear.h): the 1-2 token GEMV, tiles and
# their remainders, the sgemm above each target's GEMV_MAX_T
EDGES = sorted({t for n in LOCAL_TARGETS for m in [TARGETS[n].tuning["GEMV_MAX_T"]] for t in (m, m + 1)})
BATCHES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 16, 17, *EDGES])


@pytest.mark.parametrize("op", ["linear", "linear_glu", "qkv_rope"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_cpu_matmul_batches(op, data):
    """float32/16/bf16 weights at decode-batch token counts, on every target this host runs; rows
    split between 2 threads (qkv_rope by heads: ranges inside 8-row blocks)."""
    strategy = matmul_cases(BATCHES)[op]
    cases = [data.draw(strategy) for _ in range(data.draw(st.integers(1, 3)))]
    cases = [(o, as_f32(o, xs), a) for o, xs, a in cases]
    check_against_reference(cases, target=data.draw(st.sampled_from(LOCAL_TARGETS)))


@pytest.mark.parametrize("target", LOCAL_TARGETS)
@pytest.mark.parametrize("wdtype", ["float32", "float16", "bfloat16"])
def test_cpu_linear_rows_do_not_depend_on_the_batch(wdtype, target):
    """Up to GEMV_MAX_T tokens, a row's result is bit for bit the one it gets alone (every tile
    sums a row in the GEMV's order), so batching decode steps never changes a sequence's logits."""
    check_rows_do_not_depend_on_the_batch(wdtype, target)


@pytest.mark.parametrize("target", LOCAL_TARGETS)
@pytest.mark.parametrize("wdtype", ["float32", "float16", "bfloat16"])
def test_cpu_linear_rows_do_not_depend_on_the_batch_in_reproducible_mode(wdtype, target):
    """In reproducible mode (set_deterministic: what a seeded request's steps get) the same holds
    past GEMV_MAX_T tokens: the tiles take the batch in slabs instead of handing it to the sgemm."""
    check_rows_do_not_depend_on_the_batch(wdtype, target, reproducible=True)


def check_rows_do_not_depend_on_the_batch(wdtype, target, compile=compile_graph, reproducible=False):
    """One graph: a linear at each token count up to the target's GEMV_MAX_T (reproducible: up to
    80, across several slabs), its first and last rows the same vector; every such row must equal
    the 1-token result bit for bit."""
    rng = np.random.default_rng(0)
    K, N = 40, 20                                            # a K tail; rows ending mid-block
    w = rng.uniform(-1, 1, (N, K)).astype(np.float32).astype(np_dtype(wdtype))
    v = rng.uniform(-1, 1, (1, K)).astype(np.float32)
    top = TARGETS[target].tuning["GEMV_MAX_T"]
    ts = [t for t in (1, 2, 3, 4, 5, 7, 8, 13, 16, 17, top) if t <= top]
    if reproducible:
        ts += sorted({t for t in (top + 1, 2 * top + 1, 80) if t <= 80})
    xs = [np.concatenate([v, rng.uniform(-1, 1, (max(t - 2, 0), K)).astype(np.float32), v])[:t] for t in ts]
    graph, feeds, weights = build([("linear", [x, w], {}) for x in xs])
    with tempfile.TemporaryDirectory() as tmp:
        exe = compile(graph, weights, tmp, max_tokens=80, threads=2, target=target)
        if reproducible:
            exe.set_deterministic(True)
        got = exe.run(feeds)
    alone = got["c0_out0"][0]
    for c, t in enumerate(ts):
        np.testing.assert_array_equal(got[f"c{c}_out0"][0], alone, err_msg=f"T={t} first row")
        np.testing.assert_array_equal(got[f"c{c}_out0"][t - 1], alone, err_msg=f"T={t} last row")


def test_every_op_lowers_at_float32():
    """No registered op is left without a cpu kernel."""
    from reft.backends.cpu.lower import Lowering

    missing = [op for op in ops.REGISTRY if op not in ("input", "param", "reshape")
               and op not in AWAITING_CPU_KERNELS and not hasattr(Lowering, f"op_{op}")]
    assert not missing


def _every_op_graph():
    """One graph holding a case of every op, with float32, float16 and bfloat16 weight matrices."""
    rng = np.random.default_rng(1)
    cases = []
    for op in LOWERED_CASES:
        example = OP_CASES[op].example()
        o, xs, a = (example[0], as_f32(example[0], example[1]), example[2])
        if not uses_uint8(xs, a):
            cases.append((o, xs, a))
    for wd in ("float32", "float16", "bfloat16"):
        w = rng.uniform(-1, 1, (24, 40)).astype(np.float32).astype(np_dtype(wd))
        cases.append(("linear", [rng.uniform(-1, 1, (3, 40)).astype(np.float32), w], {}))
    return build(cases)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_compiles(target, tmp_path):
    """Every kernel compiles for every target, also those this host cannot run (AVX-512 code on an
    AVX2 host; neon with the aarch64 cross compiler where it is installed)."""
    import shutil

    from reft.backends.cpu import compile_plan
    from reft.backends.cpu.targets import compiler_prefix

    prefix = compiler_prefix(target)
    if prefix and not shutil.which(f"{prefix}g++"):
        pytest.skip(f"{prefix}g++ is not installed")
    graph, _, _ = _every_op_graph()
    record = compile_plan(graph, tmp_path, max_tokens=32, target=target)
    lib = tmp_path / Path(record["kernel"]["library"]).name
    assert lib.stat().st_size > 0 and record["target"] == target
    assert record["tuning"] == TARGETS[target].tuning
