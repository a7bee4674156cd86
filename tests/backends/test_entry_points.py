"""A plan with two entry points over the same weights: `forward` and `hidden` (the final-norm hidden
states of the tokens, a graph of the model's own weights), compiled by `reftc compile`'s Python entry
on the reference and cpu backends, each entry run through the backend's Executable and checked
against the IR interpreter (reft/ir/interpret.py) running the reference plan's graph of that entry
(a reference plan keeps the weights in the IR's layout)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from reft import backends
from reft.compiler import CompileOptions, compile_model
from reft.ir.interpret import ReferenceExecutor
from reft.runtime.plan import Plan

MODEL_DEF = '''
"""llama with a second entry point: the final RMSNorm of the token embeddings."""
from reft_models.llama import ARCHITECTURES, Config, build  # noqa: F401


def hidden(cfg, b):
    ids = b.input("input_ids", ["T"], "int32")
    x = b.embedding(ids, b.param("model.embed_tokens.weight", [cfg.vocab_size, cfg.hidden_size]), dtype="float32")
    b.output("hidden", b.rms_norm(x, b.param("model.norm.weight", [cfg.hidden_size]), eps=cfg.rms_norm_eps))


ENTRY_POINTS = {"hidden": hidden}
WRITABLE = {"hidden": ("model.norm.weight",)}
'''


@pytest.fixture(scope="module")
def model_def(tmp_path_factory):
    p = tmp_path_factory.mktemp("mdef") / "llama_hidden.py"
    p.write_text(MODEL_DEF)
    return p


def compile_two(backend, model_def, out):
    return compile_model("stories260K", out,
                         CompileOptions(backend=backend, model_def=model_def, progress=False, max_batch_tokens=32))


@pytest.fixture(scope="module")
def oracle(model_def, tmp_path_factory):
    plan = Plan(compile_two("reference", model_def, tmp_path_factory.mktemp("oracle") / "plan"))
    return {e: ReferenceExecutor(plan.graph(e), plan.weights) for e in plan.entry_points}


@pytest.mark.parametrize("backend", backends.names())
def test_two_entry_points_run_like_the_interpreter(backend, model_def, oracle, tmp_path):
    if not backends.get(backend).runnable():
        pytest.skip(f"{backend} plans cannot run here")
    out = compile_two(backend, model_def, tmp_path / "plan")
    m = json.loads((out / "manifest.json").read_text())
    assert set(m["entry_points"]) == {"forward", "hidden"}
    assert m["entry_points"]["hidden"]["writable"] == ["model.norm.weight"]
    assert "writable" not in m["entry_points"]["forward"]
    plan = Plan(out)
    exe = backends.load(plan)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, 7).astype(np.int32)
    got = exe.run({"input_ids": ids}, entry="hidden")["hidden"]
    want = oracle["hidden"].run({"input_ids": ids})["hidden"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the forward entry of the same plan, on a fresh KV cache, against the interpreter
    kv = plan.kv
    pages = {n: exe.zeros((4, kv["page_size"], kv["kv_heads"], kv["head_dim"]), kv["dtype"]) for n in kv["inputs"]}
    ref_pages = {n: np.zeros_like(a) for n, a in pages.items()}
    feeds = {"input_ids": ids, "positions": np.arange(7, dtype=np.int32), "seq_ids": np.zeros(7, np.int32),
             "logit_rows": np.array([6], np.int32), "page_table": np.array([[0]], np.int32)}
    got = exe.run({**feeds, **pages})["logits"]
    want = oracle["forward"].run({**feeds, **ref_pages})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
