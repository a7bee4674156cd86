"""Embed plans (reftc compile --task embed) and the embedding engine against transformers.

The oracle is the base model's `last_hidden_state` (the decoder with its final norm, no LM
head), pooled and L2-normalised here; reft's embeddings come from batches of inputs of different
lengths, long ones prefilled in chunks.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hf_tiny import make_model

from reft.compiler import compile_model
from reft.errors import PlanError, ReftError, RequestError
from reft.frontends.safetensors import open_weights
from reft.runtime.embed import EmbeddingEngine, EmbeddingOptions
from reft.runtime.engine import Engine

LENGTHS = (1, 7, 23, 61)   # 61 > the 16-token steps below: chunked prefill


def hf_hidden(model, ids: list[int]) -> np.ndarray:
    """transformers' last_hidden_state of the base model (final norm applied), [T, D]."""
    import torch

    with torch.no_grad():
        return model.model(torch.tensor([ids])).last_hidden_state[0].float().numpy()


def hf_pooled(model, ids: list[int], pooling: str, normalize: bool = True) -> np.ndarray:
    h = hf_hidden(model, ids)
    v = {"last": h[-1], "mean": h.mean(axis=0), "cls": h[0]}[pooling]
    return v / np.linalg.norm(v) if normalize else v


def inputs(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 512, n - 1).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_model("qwen3-qknorm", tmp_path_factory.mktemp("qwen3") / "hf")


@pytest.fixture(scope="module", params=["reference", "cpu"])
def plan(request, qwen3, tmp_path_factory):
    return compile_model(qwen3[0], tmp_path_factory.mktemp("embed") / "plan", backend=request.param, task="embed",
                         progress=False)


def embedder(plan, pooling="last", normalize=True, matryoshka=False, **kw) -> EmbeddingEngine:
    kw.setdefault("max_batch_tokens", 16)
    return EmbeddingEngine(Engine.load(plan, task="embed", **kw), EmbeddingOptions(pooling, normalize, matryoshka),
                           max_batch_tokens=kw["max_batch_tokens"])


@pytest.mark.parametrize("pooling", ["last", "mean", "cls"])
def test_pooled_embeddings_match_transformers(plan, qwen3, pooling):
    model = qwen3[1]
    xs = inputs()
    got = embedder(plan, pooling).embed(xs)
    assert got.dtype == np.float32 and got.shape == (len(xs), 64)
    for ids, g in zip(xs, got):
        want = hf_pooled(model, ids, pooling)
        assert np.abs(g - want).max() < 1e-4, (pooling, len(ids))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_without_normalisation_the_pooled_state_is_returned(plan, qwen3):
    xs = inputs(1)
    got = embedder(plan, "mean", normalize=False).embed(xs)
    for ids, g in zip(xs, got):
        want = hf_pooled(qwen3[1], ids, "mean", normalize=False)
        assert np.abs(g - want).max() < 1e-4
    assert np.linalg.norm(got, axis=1).min() > 1.5   # not unit length: the norm really is off


def test_matryoshka_dimensions_truncate_then_normalise(plan, qwen3):
    xs = inputs(2)
    got = embedder(plan, matryoshka=True).embed(xs, dimensions=16)
    assert got.shape == (len(xs), 16)
    for ids, g in zip(xs, got):
        v = hf_pooled(qwen3[1], ids, "last", normalize=False)[:16]
        assert np.abs(g - v / np.linalg.norm(v)).max() < 1e-4
    with pytest.raises(RequestError, match="--matryoshka"):
        embedder(plan).embed(xs, dimensions=16)
    with pytest.raises(RequestError, match="dimensions must be from 1 to 64"):
        embedder(plan, matryoshka=True).embed(xs, dimensions=65)


def test_an_embedding_does_not_depend_on_its_batch(plan):
    xs = inputs(3)
    together = embedder(plan, "mean").embed(xs)
    alone = np.stack([embedder(plan, "mean").embed([x])[0] for x in xs])
    assert np.abs(together - alone).max() < 1e-5


def test_shared_prefix_is_reused_with_last_pooling(plan, qwen3):
    """A prompt prefix cached by an earlier input (an instruction) is not recomputed, and the
    embedding is unchanged; mean pooling shares nothing (it needs the prefix's rows)."""
    prefix = inputs(4)[-1][:48]
    a, b = prefix + [5, 6, 7], prefix + [9, 10]
    emb = embedder(plan, kv_tokens=1024)
    emb.embed([a])
    got = emb.embed([b])[0]
    assert emb.pool.hits == 3   # 48 tokens: three full 16-token pages
    assert np.abs(got - hf_pooled(qwen3[1], b, "last")).max() < 1e-4
    mean = embedder(plan, "mean", kv_tokens=1024)
    mean.embed([a])
    mean.embed([b])
    assert mean.pool.hits == 0


def test_embed_plan_drops_the_lm_head(plan, qwen3):
    m = json.loads((plan / "manifest.json").read_text())
    assert m["task"] == "embed"
    fwd = m["entry_points"]["forward"]
    assert list(fwd["outputs"]) == ["hidden_states"]
    assert fwd["outputs"]["hidden_states"] == {"dtype": "float32", "shape": ["R", 64]}
    assert m["passes"][0]["name"] == "extract_hidden_states"
    assert m["passes"][0]["counts"] == {"hidden_states_extracted": 1}
    names = set(open_weights(plan / "weights"))
    assert "lm_head.weight" not in names and "model.norm.weight" in names
    assert "lm_head" not in (plan / "graphs" / "forward.ir").read_text()


def test_bad_requests_are_clear_errors(plan):
    emb = embedder(plan)
    for ids, msg in (([], "empty"), ([1, 512], "out of range"), ([1] * 300, "context of 256")):
        with pytest.raises(RequestError, match=msg):
            emb.embed([ids])
    assert not emb.has_work
    with pytest.raises(ReftError, match="unknown pooling"):
        embedder(plan, "max")


def test_gemma2_softcap_head_and_offset_norm(tmp_path):
    """Gemma 2: the soft-capped head is dropped with the head, and its (1 + w) final norm is kept."""
    model_dir, model = make_model("gemma2-softcap-window", tmp_path / "hf")
    plan = compile_model(model_dir, tmp_path / "plan", backend="reference", task="embed", progress=False)
    xs = inputs(6)
    got = embedder(plan, "mean").embed(xs)
    for ids, g in zip(xs, got):
        assert np.abs(g - hf_pooled(model, ids, "mean")).max() < 1e-4
    assert "softcap" not in (plan / "graphs" / "forward.ir").read_text().split("return")[-1]


def test_base_model_checkpoint_without_prefix_or_head(qwen3, tmp_path):
    """An embedding checkpoint as Qwen3-Embedding ships it: the decoder saved without the causal-LM
    wrapper (no `model.` prefix, no lm_head) under a ForCausalLM config."""
    import shutil

    src, model = qwen3
    base = tmp_path / "base"
    model.model.save_pretrained(base, safe_serialization=True)
    cfg = json.loads((src / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, base / f)
    assert "layers.0.self_attn.q_proj.weight" in set(open_weights(base))
    plan = compile_model(base, tmp_path / "plan", backend="reference", task="embed", progress=False)
    xs = inputs(7)
    got = embedder(plan).embed(xs)
    for ids, g in zip(xs, got):
        assert np.abs(g - hf_pooled(model, ids, "last")).max() < 1e-4
    with pytest.raises(ReftError, match="lm_head.weight"):   # generation needs the head it lacks
        compile_model(base, tmp_path / "gen", backend="reference", progress=False)


def test_task_mismatch_is_one_clear_error(plan, qwen3, tmp_path):
    with pytest.raises(PlanError, match="--task embed"):
        Engine.load(plan)
    gen = compile_model(qwen3[0], tmp_path / "gen", backend="reference", progress=False)
    with pytest.raises(PlanError, match="compiled for generation"):
        Engine.load(gen, task="embed")
    with pytest.raises(ReftError, match="unknown task"):
        compile_model(qwen3[0], tmp_path / "x", backend="reference", task="rerank", progress=False)


def cli(tool: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"reft.cli.{tool}", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    return lines[0]


def test_cli_inspect_shows_the_task_and_run_refuses_to_generate(plan):
    p = cli("reftc", "inspect", plan)
    assert p.returncode == 0 and "task        embed" in p.stdout, p.stderr
    assert "-> hidden_states: float32[R,64]" in p.stdout
    line = one_error_line(cli("reft", "run", plan, "--prompt", "hello"))
    assert "--task embed" in line and "/v1/embeddings" in line
    assert "apply to --serve" in one_error_line(cli("reft", "run", plan, "--prompt", "hello", "--pooling", "mean"))
