"""The cpu kernels of the optimizer ops (templates/optim.h) against the numpy reference: sizes across
the norm's 8192-value blocks and the vector tails, on every target this host runs; both give the
same bits whatever the thread count (a resumed run may use other threads)."""
from __future__ import annotations

import numpy as np
import pytest
from test_cpu_ops import LOCAL_TARGETS, check_against_reference

from reft.backends.cpu import compile_graph
from reft.ir import GraphBuilder

pytestmark = pytest.mark.skipif(not LOCAL_TARGETS, reason="no C++ compiler")

SIZES = [(1,), (17,), (8192,), (8193,), (3, 8192 + 5), (40, 24)]


def adamw_case(rng, shape, max_norm, wd=0.1, step=7):
    p, g = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    m = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    v = (rng.uniform(0, 0.01, shape)).astype(np.float32)
    xs = [p, g, m, v, np.array(3e-3, np.float32), np.array(step, np.int32)]
    if max_norm:
        xs.append(np.array((g.astype(np.float64) ** 2).sum() * 2, np.float32))
    return "adamw_update", xs, dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd, max_norm=max_norm)


@pytest.mark.parametrize("target", LOCAL_TARGETS)
def test_optimizer_kernels_match_the_reference(target):
    rng = np.random.default_rng(0)
    cases = [("grad_norm_sq", [rng.standard_normal(s).astype(np.float32) for s in SIZES], {}),
             ("grad_norm_sq", [rng.standard_normal((5,)).astype(np.float32)], {})]
    cases += [adamw_case(rng, s, mn) for s in SIZES[::2] for mn in (0.0, 1.0)]
    cases += [adamw_case(rng, (8193,), 1.0, wd=0.0, step=1)]
    check_against_reference(cases, target=target)


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    rng = np.random.default_rng(1)
    grads = {f"g{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(SIZES)}
    b = GraphBuilder("train_step")
    gs = [b.input(k, g.shape, "float32") for k, g in grads.items()]
    sumsq = b.grad_norm_sq(*gs)
    b.output("sumsq", sumsq)
    shape = SIZES[4]
    state = {k: b.param(k, shape) for k in ("p", "m", "v")}
    lr, step = b.input("lr", (), "float32"), b.input("step", (), "int32")
    b.adamw_update(state["p"], gs[4], state["m"], state["v"], lr, step, sumsq, beta1=0.9, beta2=0.95, eps=1e-8,
                   weight_decay=0.1, max_norm=1.0)
    init = {"p": rng.standard_normal(shape).astype(np.float32), "m": np.zeros(shape, np.float32),
            "v": np.zeros(shape, np.float32)}
    feeds = {**grads, "lr": np.array(1e-3, np.float32), "step": np.array(1, np.int32)}
    results = []
    for threads in (1, 2, 3):
        (tmp_path / str(threads)).mkdir()
        exe = compile_graph(b.graph, init, tmp_path / str(threads), threads=threads)
        out = exe.run(feeds)["sumsq"]
        results.append((out.tobytes(), *(exe.weights.array(k, np.float32, shape).tobytes() for k in init)))
    assert results[0] == results[1] == results[2]
