"""add_optimizer: clipping + AdamW appended to a hand-built graph whose gradients are graph inputs
(fake grads), run for several steps on the reference interpreter and the cpu backend against
torch.optim.AdamW + torch.nn.utils.clip_grad_norm_ (the independent oracle)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from reft import backends
from reft.errors import ReftError
from reft.ir import GraphBuilder, parse_graph, print_graph, verify
from reft.ir.interpret import ReferenceExecutor
from reft.passes.add_optimizer import LR, NORM, STEP, AdamW, add_optimizer, state_names, written_params
from reft.passes.context import PassContext, WeightStore

SHAPES = {"model.embed_tokens.weight": (40, 24), "model.layers.0.mlp.up_proj.weight": (7, 24),
          "model.layers.0.mlp.up_proj.bias": (7,), "model.norm.weight": (24,), "frozen.weight": (3, 4)}
TRAINABLE = [k for k in SHAPES if k != "frozen.weight"]


def train_graph():
    """Params, a frozen one among them; `grad.<name>` outputs fed straight from inputs."""
    b = GraphBuilder("train_step")
    for name, shape in SHAPES.items():
        p = b.param(name, shape)
        if name in TRAINABLE:
            b.output("grad." + name, b.input("fake_grad." + name, shape, "float32"))
        else:
            b.output("frozen_out", b.mul(p, p))
    return b.graph


def compiled(cfg: AdamW, seed=0):
    rng = np.random.default_rng(seed)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    ctx = PassContext(WeightStore(init), options={"optimizer": cfg})
    g = add_optimizer(train_graph(), ctx)
    return g, ctx, {k: np.array(ctx.weights[k]) for k in ctx.weights}


def schedule(seed=1, steps=6):
    """Per step: lr and fake grads, scaled so the global norm is above max_norm on some steps, below on others."""
    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        scale = [3.0, 0.01, 1.0, 0.05, 10.0, 0.2][(step - 1) % 6]
        yield step, np.float32(1e-2 * (1 + step) / 3), {k: (rng.standard_normal(SHAPES[k]) * scale).astype(np.float32)
                                                         for k in TRAINABLE}


def torch_run(init, cfg: AdamW, steps):
    params = {k: torch.nn.Parameter(torch.tensor(init[k])) for k in TRAINABLE}
    decay = [p for k, p in params.items() if p.ndim > 1]
    no_decay = [p for k, p in params.items() if p.ndim == 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1.0, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.eps, foreach=False)
    norms = []
    for step, lr, grads in steps:
        for k, p in params.items():
            p.grad = torch.tensor(grads[k])
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm) if cfg.max_grad_norm \
            else torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params.values()]))
        norms.append(float(norm))
        for group in opt.param_groups:
            group["lr"] = float(lr)
        opt.step()
    return params, opt, norms


def feeds(step, lr, grads):
    return {LR: np.asarray(lr, np.float32), STEP: np.asarray(step, np.int32),
            **{"fake_grad." + k: g for k, g in grads.items()}}


def run_reference(g, weights, steps):
    ex = ReferenceExecutor(g, weights)
    return [float(np.sqrt(ex.run(feeds(*s))[NORM])) for s in steps], weights


def run_cpu(g, weights, steps, tmp):
    from reft.backends.cpu import compile_graph

    exe = compile_graph(g, {k: v.copy() for k, v in weights.items()}, tmp, threads=2)
    norms = [float(np.sqrt(exe.run(feeds(*s))[NORM])) for s in steps]
    return norms, {k: exe.weights.array(k, np.float32, v.shape).copy() for k, v in weights.items()}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("cfg", [AdamW(weight_decay=0.1, max_grad_norm=1.0),
                                 AdamW(beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.0, max_grad_norm=0.0)],
                         ids=["clip-decay", "no-clip"])
def test_adamw_steps_match_torch(backend, cfg, tmp_path):
    if backend == "cpu" and not backends.get("cpu").available():
        pytest.skip("no C++ compiler")
    g, ctx, weights = compiled(cfg)
    init = {k: v.copy() for k, v in weights.items()}
    steps = list(schedule())
    if backend == "reference":
        norms, got = run_reference(g, weights, steps)
    else:
        norms, got = run_cpu(g, weights, steps, tmp_path)
    params, opt, want_norms = torch_run(init, cfg, steps)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    for k, p in params.items():
        np.testing.assert_allclose(got[k], p.detach().numpy(), rtol=1e-5, atol=1e-5, err_msg=k)
        m, v = state_names(k)
        np.testing.assert_allclose(got[m], opt.state[p]["exp_avg"].numpy(), rtol=1e-5, atol=1e-7, err_msg=m)
        np.testing.assert_allclose(got[v], opt.state[p]["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-9, err_msg=v)
    np.testing.assert_array_equal(got["frozen.weight"], init["frozen.weight"])


def test_pass_structure():
    g, ctx, _ = compiled(AdamW(weight_decay=0.1))
    verify(g)
    assert print_graph(parse_graph(print_graph(g))) == print_graph(g)
    assert not [k for k in g.outputs if k.startswith("grad.")] and NORM in g.outputs and "frozen_out" in g.outputs
    updates = [n for n in g.nodes if n.op == "adamw_update"]
    assert [n.inputs[0].node.name for n in updates] == TRAINABLE
    assert {n.inputs[0].node.name: n.attrs["weight_decay"] for n in updates} == {
        "model.embed_tokens.weight": 0.1, "model.layers.0.mlp.up_proj.weight": 0.1,
        "model.layers.0.mlp.up_proj.bias": 0.0, "model.norm.weight": 0.0}
    want = sorted(TRAINABLE + [s for k in TRAINABLE for s in state_names(k)])
    assert written_params(g) == want == ctx.artifacts["writable"]["train_step"]
    assert [n.name for n in g.inputs()][-2:] == [LR, STEP]
    assert ctx.counters[""] == {"adamw_update": 4, "no_weight_decay": 2, "clipped": 1}
    assert all(not ctx.weights[s].any() for s in want if s.startswith("optim."))


def test_no_trainable_parameters_is_an_error():
    b = GraphBuilder("train_step")
    b.output("y", b.mul(b.param("w", (2,)), b.param("w", (2,))))
    with pytest.raises(ReftError, match="no trainable parameters"):
        add_optimizer(b.graph, PassContext())


def test_gradient_of_a_low_precision_param_is_an_error():
    b = GraphBuilder("train_step")
    b.param("w", (2,), "bfloat16")
    b.output("grad.w", b.input("g", (2,), "bfloat16"))
    with pytest.raises(ReftError, match="float32 master weights"):
        add_optimizer(b.graph, PassContext())
