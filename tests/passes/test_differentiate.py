"""Autodiff over the IR (reft/passes/differentiate.py, attach_loss.py).

- Every gradient rule against finite differences: one op on random cases (tests/strategies.py),
  and random small graphs (chains of ops, several outputs), each seeded with random cotangents.
- Fused ops' rules equal the rules of the ops they replace (a whole training graph, fused or not).
- Gradient checkpointing gives the same gradients and keeps only layer inputs for the backward.
- Frozen parameters get no gradient nodes; the training graph prints, parses back and verifies.
(Loss and gradients against transformers: tests/models/test_train_grads.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import OP_CASES, random_graphs

from models import llama
from reft.errors import ModelError, ReftError
from reft.ir import GraphBuilder, ops, parse_graph, print_graph, verify
from reft.ir.interpret import ReferenceExecutor
from reft.ir.types import FLOAT_DTYPES, dtype_name
from reft.passes.attach_loss import attach_loss
from reft.passes.context import PassContext, WeightStore
from reft.passes.differentiate import build_train_graph, differentiate, gradients, layer_segments
from reft.passes.eliminate_dead_code import eliminate_dead_code
from reft.passes.fuse_add_rms_norm import fuse_add_rms_norm
from reft.passes.fuse_glu import fuse_glu
from reft.passes.fuse_projections import fuse_projections
from reft.passes.fuse_qkv_rope import fuse_qkv_rope

NUMERIC = settings(max_examples=25, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
DIFFERENTIABLE = sorted(n for n, d in ops.REGISTRY.items() if d.vjp is not None)
NOT_DIFFERENTIATED = {"linear_cross_entropy": {3}}     # input positions without a gradient (loss_scale)
LOSS_AUX = {"linear_cross_entropy": {1}}               # outputs gradients do not flow through (lse)
NO_RULE_FROM = {"causal_attention": 5}                 # optional inputs without a gradient rule yet (sinks)


def is_float(x) -> bool:
    return dtype_name(x.dtype) in FLOAT_DTYPES


def check_numerically(graph, feeds, weights, seeds_of, wrt_names, rng):
    """Seeds each float output in `seeds_of` with a random cotangent, differentiates w.r.t. the named
    inputs/params and compares <grad, u> with a 4th-order central difference along random u."""
    fwd = parse_graph(print_graph(graph))
    g = parse_graph(print_graph(graph))
    b = GraphBuilder(graph=g)
    cts, seeds = {}, []
    for name in seeds_of:
        v = g.outputs[name]
        ct = b.input(f"ct.{name}", v.shape, v.dtype)
        seeds.append((v, ct))
    run0 = ReferenceExecutor(fwd, weights).run(feeds)
    for name in seeds_of:
        cts[f"ct.{name}"] = rng.standard_normal(run0[name].shape).astype(np.float32)
    sources = {n.name: n.out for n in g.nodes if n.op in ("input", "param") and n.name in wrt_names}
    grads = gradients(g, seeds, list(sources.values()))
    for name, gv in zip(sources, grads):
        if gv is not None:
            g.outputs[f"grad.{name}"] = gv
    verify(g)
    verify(parse_graph(print_graph(g)))
    got = ReferenceExecutor(g, weights).run({**feeds, **cts})
    arrays = {k: (feeds[k] if k in feeds else weights[k]) for k in sources}
    u = {k: rng.standard_normal(a.shape).astype(np.float32) for k, a in arrays.items()}
    ana = sum(float(np.sum(got[f"grad.{k}"].astype(np.float64) * u[k])) for k in u if f"grad.{k}" in got)
    gnorm = np.sqrt(sum(float(np.sum(got[f"grad.{k}"].astype(np.float64) ** 2)) for k in u if f"grad.{k}" in got))

    def loss(s):
        f = {k: v for k, v in feeds.items()}
        w = dict(weights)
        for k, a in arrays.items():
            (f if k in feeds else w)[k] = (a.astype(np.float64) + s * u[k]).astype(np.float32)
        out = ReferenceExecutor(fwd, w).run(f)
        return sum(float(np.sum(out[n].astype(np.float64) * cts[f"ct.{n}"])) for n in seeds_of)

    h = 1e-3
    num = (8 * (loss(h) - loss(-h)) - (loss(2 * h) - loss(-2 * h))) / (12 * h)
    # float32 rounding (of outputs and of O(1) intermediates, e.g. 1 + tanh) moves the loss by
    # ~6e-8 * size: ~1e-4 * size after dividing by h
    size = sum(float(np.sum(np.abs((np.abs(run0[n].astype(np.float64)) + 1) * cts[f"ct.{n}"]))) for n in seeds_of)
    assert abs(num - ana) <= 2e-3 * gnorm * np.sqrt(len(u)) + 2e-4 * size + 1e-6, (num, ana, gnorm, size)


def _as_f32(op, xs, attrs):
    xs = [x.astype(np.float32) if is_float(x) else x for x in xs]
    attrs = dict(attrs)
    if op == "embedding" or (op == "cast" and is_float(xs[0])):
        attrs["dtype"] = "float32"
    return xs, attrs


@pytest.mark.parametrize("op", DIFFERENTIABLE)
@NUMERIC
@given(data=st.data())
def test_rule_matches_finite_differences(op, data):
    _, xs, attrs = data.draw(OP_CASES[op])
    xs, attrs = _as_f32(op, xs[:NO_RULE_FROM.get(op)], attrs)
    b = GraphBuilder("f")
    feeds = {f"x{i}": x for i, x in enumerate(xs)}
    vals = [b.input(f"x{i}", tuple(int(d) for d in x.shape), dtype_name(x.dtype)) for i, x in enumerate(xs)]
    outs = b.emit(op, *vals, **attrs)
    outs = outs if isinstance(outs, list) else [outs]
    seeds = []
    for j, v in enumerate(outs):
        if v.dtype in FLOAT_DTYPES and j not in LOSS_AUX.get(op, ()):
            b.output(f"y{j}", v)
            seeds.append(f"y{j}")
    wrt = [f"x{i}" for i, x in enumerate(xs) if is_float(x) and i not in NOT_DIFFERENTIATED.get(op, ())]
    if not seeds or not wrt:
        return
    check_numerically(b.graph, feeds, {}, seeds, set(wrt), np.random.default_rng(0))


def _strip_low_precision_casts(graph):
    """cast(cast(a, f16|bf16), f32) -> a: rounding is piecewise constant, so finite differences
    cannot see the straight-through gradient the cast rule gives."""
    for n in list(graph.nodes):
        inner = n.inputs[0].node if n.op == "cast" else None
        if inner is not None and inner.op == "cast" and inner.inputs[0].type == n.out.type:
            graph.replace_uses(n.out, inner.inputs[0])
    return eliminate_dead_code(graph, PassContext())


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=random_graphs())
def test_random_graphs_match_finite_differences(case):
    graph, weights, feeds = case
    graph = _strip_low_precision_casts(graph)
    floats = [k for k, v in graph.outputs.items() if v.dtype in FLOAT_DTYPES]
    wrt = {n.name for n in graph.nodes if n.op in ("input", "param") and n.out.dtype in FLOAT_DTYPES}
    check_numerically(graph, feeds, weights, floats, wrt, np.random.default_rng(1))


# -- whole training graphs ---------------------------------------------------------------

def tiny_config(**over):
    hf = dict(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=False)
    hf.update(over)
    return llama.Config.from_hf(hf)


CONFIGS = {
    "llama": tiny_config(),
    "tied-gelu-biases": tiny_config(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh", attention_bias=True,
                                    mlp_bias=True),
    "qwen3-qknorm-window": tiny_config(head_dim=6, sliding_window=3, layer_types=["sliding_attention", "full_attention",
                                                                                  "sliding_attention"]),
}
CONFIGS["qwen3-qknorm-window"] = llama.Config(**{**CONFIGS["qwen3-qknorm-window"].__dict__, "qk_norm": True,
                                                 "qkv_bias": True})


def random_weights(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {n.name: (rng.uniform(0.5, 1.5, n.out.shape) if n.name.endswith("norm.weight")
                     else rng.normal(0, 0.3, n.out.shape)).astype(np.float32) for n in graph.params()}


def feeds(T1=9, T2=6, V=40, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, T1 + T2).astype(np.int32)
    targets = np.concatenate([ids[1:T1], [-100], ids[T1 + 1:], [-100]]).astype(np.int32)
    targets[:3] = -100                                                          # a masked prompt
    return {"input_ids": ids, "positions": np.concatenate([np.arange(T1), np.arange(T2)]).astype(np.int32),
            "seq_ids": np.repeat([0, 1], [T1, T2]).astype(np.int32), "targets": targets,
            "loss_scale": np.array(1.0 / np.sum(targets != -100), np.float32)}


def forward_with_loss(cfg):
    b = GraphBuilder("train_step")
    llama.build(cfg, b)
    return attach_loss(b.graph, PassContext())


def _unfused_parts(name):
    segs = name.split(".")
    i = next(j for j, s in enumerate(segs) if "+" in s)
    return [".".join(segs[:i] + [m] + segs[i + 1:]) for m in segs[i].split("+")]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_rules_match_unfused(name):
    cfg = CONFIGS[name]
    plain = build_train_graph(llama, cfg)
    weights = random_weights(plain)
    want = ReferenceExecutor(plain, weights).run(feeds())
    graph = forward_with_loss(cfg)
    ctx = PassContext(WeightStore(weights))
    for fn in (fuse_projections, eliminate_dead_code, fuse_qkv_rope, fuse_glu, fuse_add_rms_norm):
        ctx.current = fn.__name__
        graph = fn(graph, ctx)
    counts = graph.op_counts()
    assert counts.get("qkv_rope") == 3 and counts.get("linear_glu") == 3 and counts.get("add_rms_norm", 0) >= 6
    graph = eliminate_dead_code(differentiate(graph, ctx), ctx)
    verify(graph)
    got = ReferenceExecutor(graph, ctx.weights).run(feeds())
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    for k, g in got.items():
        if not k.startswith("grad."):
            continue
        if "+" in k:
            w = np.concatenate([want[f"grad.{p}"] for p in _unfused_parts(k[5:])])
        else:
            w = want[k]
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max(), err_msg=k)


def _differentiate_and_saved(cfg, checkpointing: bool):
    """The training graph, and the layer-internal forward activations its backward reads."""
    graph = forward_with_loss(cfg)
    segments = layer_segments(graph)
    assert len(segments) == cfg.num_hidden_layers
    boundary = {id(s[-1].out) for s in segments}                         # each layer's residual output
    inside = {id(v) for s in segments for n in s for v in n.outputs} - boundary
    forward = {id(n) for n in graph.nodes}
    ctx = PassContext(options={"gradient_checkpointing": checkpointing})
    graph = eliminate_dead_code(differentiate(graph, ctx), ctx)
    assert ctx.counters[""]["recomputed_layers"] == (len(segments) if checkpointing else 0)
    verify(parse_graph(print_graph(graph)))
    return graph, {id(v) for n in graph.nodes if id(n) not in forward for v in n.inputs} & inside


def test_gradient_checkpointing_same_gradients_fewer_saved_activations():
    cfg = CONFIGS["tied-gelu-biases"]
    plain, saved = _differentiate_and_saved(cfg, False)
    assert saved                                  # without it, the backward reads the layers' activations
    graph, saved = _differentiate_and_saved(cfg, True)
    assert not saved                              # with it, only each layer's input (recomputed from it)
    weights = random_weights(plain)
    want = ReferenceExecutor(plain, weights).run(feeds())
    got = ReferenceExecutor(graph, weights).run(feeds())
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_frozen_parameters_get_no_gradient_nodes():
    cfg = CONFIGS["llama"]
    trainable = {"model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight", "model.norm.weight"}
    ctx = PassContext()
    graph = build_train_graph(llama, cfg, trainable=trainable, ctx=ctx)
    assert set(graph.outputs) == {"loss"} | {f"grad.{n}" for n in trainable}
    counts = graph.op_counts()
    assert counts["causal_attention_grad"] == 1 and counts["linear_grad_weight"] == 2 and "scatter_rows" not in counts
    assert ctx.counters["differentiate"]["trainable"] == 3
    weights = random_weights(graph)
    full = build_train_graph(llama, cfg)
    got, want = ReferenceExecutor(graph, weights).run(feeds()), ReferenceExecutor(full, weights).run(feeds())
    for k in graph.outputs:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_train_graph_signature_text_and_pipeline_counters():
    ctx = PassContext()
    graph = build_train_graph(llama, CONFIGS["tied-gelu-biases"], ctx=ctx)
    assert [n.name for n in graph.inputs()] == ["input_ids", "positions", "seq_ids", "targets", "loss_scale"]
    assert list(graph.outputs)[0] == "loss"
    assert graph.outputs["loss"].type.shape == () and "grad.lm_head.weight" not in graph.outputs
    again = parse_graph(print_graph(graph))
    verify(again)
    assert print_graph(again) == print_graph(graph)
    assert ctx.counters["attach_loss"]["loss_attached"] == 1 and ctx.counters["attach_loss"]["rows_widened"] == 1
    assert "take_rows" not in graph.op_counts() and "linear_cross_entropy_grad" in graph.op_counts()


def test_errors_name_the_problem():
    with pytest.raises(ReftError, match="not a weight"):
        build_train_graph(llama, CONFIGS["llama"], trainable={"model.layers.9.nope.weight"})
    with pytest.raises(ReftError, match="no trainable parameters"):
        build_train_graph(llama, CONFIGS["llama"], trainable=set())
    b = GraphBuilder("f")
    x = b.input("x", ("T", 4), "float32")
    b.output("logits", b.silu(x))
    with pytest.raises(ModelError, match="logits"):
        attach_loss(b.graph, PassContext())


def test_differentiating_through_an_op_without_a_rule_or_a_loss_not_made_by_a_loss_op_fails():
    def graph(make_loss):
        b = GraphBuilder("f")
        x = b.input("x", ("T", 4), "float32")
        w = b.param("w", (4,))
        b.output("loss", make_loss(b, b.mul(x, w)))
        return b.graph

    with pytest.raises(ReftError, match="sum_rows has no gradient rule"):
        differentiate(graph(lambda b, y: b.sum_rows(b.sum_rows(y))), PassContext())

    def cast_of_loss(b, y):
        head = b.param("head", (5, 4))
        t, s = b.input("targets", ("T",), "int32"), b.input("loss_scale", (), "float32")
        return b.cast(b.linear_cross_entropy(y, head, t, s)[0], dtype="float32")

    with pytest.raises(ReftError, match="loss must be made by"):
        differentiate(graph(cast_of_loss), PassContext())
