"""Training graphs on the cpu backend against the reference interpreter (which tests/models/
test_train_grads.py checks against torch autograd): for tiny random models of every family
(tests/hf_tiny.py), the loss and every parameter's gradient within 1e-4 relative for a pretraining
block and an SFT batch with -100 targets, and one full train step (+ add_optimizer: clipping, AdamW)
writing the same weights and optimizer state in place within 1e-5. Training plans keep the weights
the backward ops or the optimizer read row-major (not packed), so this also runs the forward
matmuls on row-major weights. The backward kernels' tile edges (cross-entropy chunks of CE_ROWS x
CE_VOCAB, rms_norm_grad's row blocks, converted weight chunks) get cases of their own."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hf_tiny import TRAIN_CASES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import matmul_cases
from test_cpu_ops import as_f32, build

sys.path.insert(0, str(Path(__file__).parent.parent / "models"))
from test_train_grads import batch, pretrain_batch, sft_batch, tokens, train_model  # noqa: E402

from reft import backends  # noqa: E402
from reft.backends.cpu import compile_graph  # noqa: E402
from reft.backends.cpu.lower import CE_ROWS, CE_VOCAB, RMS_GRAD_BLOCK, lower  # noqa: E402
from reft.backends.cpu.targets import host_target  # noqa: E402
from reft.ir import GraphBuilder  # noqa: E402
from reft.ir.interpret import ReferenceExecutor  # noqa: E402
from reft.ir.types import np_dtype  # noqa: E402
from reft.passes.add_optimizer import LR, NORM, STEP, AdamW, add_optimizer, written_params  # noqa: E402
from reft.passes.context import PassContext, WeightStore  # noqa: E402

pytestmark = pytest.mark.skipif(not backends.get("cpu").available(), reason="no C++ compiler")
THREADS = 2
MAX_TOKENS = 96


@pytest.fixture(scope="module", params=TRAIN_CASES)
def case(request, tmp_path_factory):
    """(name, train graph, its weights, the compiled cpu executable)."""
    _, graph, weights = train_model(request.param, tmp_path_factory)
    exe = compile_graph({"train_step": graph}, weights, tmp_path_factory.mktemp(request.param + "-cpu"),
                        max_tokens=MAX_TOKENS, threads=THREADS)
    return request.param, graph, weights, exe


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def long_batch(rng):
    """More tokens than any target's GEMV_MAX_T: the forward matmuls take the sgemm path."""
    seqs = [tokens(rng, 45), tokens(rng, 33)]
    return seqs, [list(s) for s in seqs]


@pytest.mark.parametrize("kind", ["pretrain", "sft", "long"])
def test_loss_and_every_gradient_match_the_reference(case, kind):
    name, graph, weights, exe = case
    make = {"pretrain": pretrain_batch, "sft": sft_batch, "long": long_batch}[kind]
    seqs, labels = make(np.random.default_rng(7))
    feeds = batch(seqs, labels)
    want = ReferenceExecutor(graph, weights).run(feeds)
    got = exe.run(feeds, entry="train_step")
    assert set(got) == set(want)
    assert abs(float(got["loss"]) - float(want["loss"])) <= 1e-4 * abs(float(want["loss"])), (name, kind)
    for k, w in want.items():
        assert got[k].shape == w.shape and got[k].dtype == w.dtype, (name, k)
        assert rel_err(got[k], w) < 1e-4, (name, kind, k, rel_err(got[k], w))


def test_train_step_updates_the_weights_like_the_reference(case, tmp_path):
    """Forward, backward, global-norm clipping and AdamW in one call, parameters and moments
    written in place; the step starts from nonzero moments so every term of the update counts."""
    name, graph, weights, _ = case
    rng = np.random.default_rng(3)
    init = dict(weights)
    for k, w in weights.items():   # moments of an earlier step
        init[f"optim.m.{k}"] = (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
        init[f"optim.v.{k}"] = rng.uniform(0, 1e-5, w.shape).astype(np.float32)
    ctx = PassContext(WeightStore(init), options={"optimizer": AdamW(weight_decay=0.1, max_grad_norm=0.5)})
    step_graph = add_optimizer(build_train_graph_like(graph), ctx)
    state = {k: np.array(ctx.weights[k]) for k in ctx.weights}
    feeds = {**batch(*sft_batch(np.random.default_rng(11))), LR: np.array(1e-2, np.float32),
             STEP: np.array(4, np.int32)}
    ref_state = {k: v.copy() for k, v in state.items()}
    want = ReferenceExecutor(step_graph, ref_state).run(feeds)
    exe = compile_graph({"train_step": step_graph}, {k: v.copy() for k, v in state.items()}, tmp_path,
                        max_tokens=MAX_TOKENS, threads=THREADS)
    got = exe.run(feeds, entry="train_step")
    assert rel_err(got[NORM], want[NORM]) < 1e-4 and rel_err(got["loss"], want["loss"]) < 1e-4, name
    written = written_params(step_graph)
    assert written and all(not np.array_equal(ref_state[k], state[k]) for k in written), name
    for k in {n.name for n in step_graph.params()}:
        w = ref_state[k]
        g = exe.weights.array(k, w.dtype, w.shape)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5, err_msg=f"{name}: {k}")


def build_train_graph_like(graph):
    """A fresh copy of a train graph (add_optimizer rewrites its input in place)."""
    from reft.ir import parse_graph, print_graph

    return parse_graph(print_graph(graph))


# -- tile edges of the backward kernels -------------------------------------------------------------
def _lce_cases(rng, T, V, D, head_dtype):
    x = rng.uniform(-1, 1, (T, D)).astype(np.float32)
    head = rng.uniform(-1, 1, (V, D)).astype(np.float32).astype(np_dtype(head_dtype))
    targets = rng.integers(0, V, T).astype(np.int32)
    targets[rng.random(T) < 0.2] = -100
    scale = np.array(1.0 / max(int((targets != -100).sum()), 1), np.float32)
    return x, head, targets, scale


@pytest.mark.parametrize("head_dtype", ["float32", "bfloat16"])
def test_backward_kernels_across_tiles(head_dtype, tmp_path):
    """Several cross-entropy tiles each way (a partial last one), rms_norm_grad over several row
    blocks, and a matmul weight (row-major: the backward reads it too) in converted chunks."""
    rng = np.random.default_rng(0)
    T, D, V = CE_ROWS * 2 + 13, 24, CE_VOCAB * 2 + 37
    x, head, targets, scale = _lce_cases(rng, T, V, D, head_dtype)
    N = 300                                        # > GEMM_CHUNK rows of a converted weight
    w = rng.uniform(-1, 1, (N, D)).astype(np.float32).astype(np_dtype(head_dtype))
    b = GraphBuilder("train_step")
    xi, ti, si = b.input("x", ["T", D], "float32"), b.input("targets", ["T"], "int32"), b.input("scale", [], "float32")
    hp, wp = b.param("head", [V, D], head_dtype), b.param("w", [N, D], head_dtype)
    loss, lse = b.linear_cross_entropy(xi, hp, ti, si)
    dx, dhead = b.linear_cross_entropy_grad(xi, hp, ti, si, lse)
    y = b.linear(xi, wp)                           # row-major weight, sgemm path (T > GEMV_MAX_T)
    norm = b.param("norm", [N], "float32")
    gy, gnorm = b.rms_norm_grad(y, y, norm, eps=1e-5)
    for k, v in dict(loss=loss, lse=lse, dx=dx, dhead=dhead, y=y, gy=gy, gnorm=gnorm,
                     gin=b.linear_grad_input(gy, wp), gw=b.linear_grad_weight(gy, xi)).items():
        b.output(k, v)
    assert T > RMS_GRAD_BLOCK * 4
    weights = {"head": head, "w": w, "norm": rng.uniform(0.5, 1.5, N).astype(np.float32)}
    feeds = {"x": x, "targets": targets, "scale": scale}
    want = ReferenceExecutor(b.graph, weights).run(feeds)
    exe = compile_graph({"train_step": b.graph}, weights, tmp_path, max_tokens=T, threads=THREADS)
    got = exe.run(feeds, entry="train_step")
    for k, v in want.items():
        assert rel_err(got[k], v) < 1e-4, (k, rel_err(got[k], v))


# -- forward matmuls on row-major weights -----------------------------------------------------------
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matmuls_read_row_major_weights(data):
    """linear, linear_glu and qkv_rope whose weight a backward op also reads (so it stays row-major)
    at GEMV and sgemm token counts, with float32/16/bf16 weights, against the reference."""
    tokens = st.sampled_from([1, 2, 5, 17, 65, 70])
    wdtype = data.draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    cases = []
    for op, strategy in matmul_cases(tokens).items():
        o, xs, a = data.draw(strategy)
        xs[1] = xs[1].astype(np.float32).astype(np_dtype(wdtype))
        cases.append((o, as_f32(o, xs), a))
    graph, feeds, weights = build(cases)
    b = GraphBuilder(graph=graph)
    for name, w in weights.items():   # dy @ w: the weight has a reader that needs it row-major
        dy = b.input(f"dy.{name}", [3, w.shape[0]], "float32")
        feeds[dy.node.name] = np.random.default_rng(1).uniform(-1, 1, (3, w.shape[0])).astype(np.float32)
        b.output(f"gin.{name}", b.linear_grad_input(dy, b.param(name, w.shape, wdtype)))
    assert lower(graph, 80, host_target()).layouts == {}
    want = ReferenceExecutor(graph, weights).run(feeds)
    with tempfile.TemporaryDirectory() as tmp:
        got = compile_graph(graph, weights, tmp, max_tokens=80, threads=THREADS).run(feeds)
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=2e-4, atol=2e-4, err_msg=k)


def test_entries_sharing_a_weight_agree_on_its_layout(tmp_path):
    """A plan's inference entry reads a weight that its training entry also differentiates through:
    both read it row-major (one layout per weight), and both match the reference."""
    rng = np.random.default_rng(2)
    w = rng.uniform(-1, 1, (24, 40)).astype(np.float32)
    graphs = {}
    for entry in ("forward", "train_step"):
        b = GraphBuilder(entry)
        x, wp = b.input("x", ["T", 40], "float32"), b.param("w", [24, 40])
        b.output("y", b.linear(x, wp))
        if entry == "train_step":
            b.output("gin", b.linear_grad_input(b.input("dy", ["T", 24], "float32"), wp))
        graphs[entry] = b.graph
    feeds = {"x": rng.uniform(-1, 1, (5, 40)).astype(np.float32), "dy": rng.uniform(-1, 1, (5, 24)).astype(np.float32)}
    exe = compile_graph(graphs, {"w": w}, tmp_path, max_tokens=8, threads=THREADS)
    for entry, g in graphs.items():
        want = ReferenceExecutor(g, {"w": w}).run(feeds)
        got = exe.run({k: v for k, v in feeds.items() if k in {n.name for n in g.inputs()}}, entry=entry)
        for k, v in want.items():
            np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-5, err_msg=f"{entry}: {k}")
