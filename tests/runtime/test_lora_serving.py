"""LoRA adapters per request (`reftc compile --max-loras`, reft/runtime/lora.py) against the merged
model: two PEFT adapters (made by peft on a tiny random Llama, B nonzero, different ranks, targets
and alpha, one rsLoRA) are loaded into one plan with adapter slots; requests for either adapter and
for the base model share batches, and each gives the logits (1e-4) and greedy tokens that a plan
compiled from the merged checkpoint (`peft merge_and_unload`) gives — on the reference and the cpu
backends. The prefix cache never shares pages across adapters."""
from __future__ import annotations

import lora_tiny
import numpy as np
import pytest

from reft.compiler import compile_model
from reft.errors import ReftError, RequestError
from reft.runtime.engine import Chunk, Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams
from reft.runtime.serving import Request, ServingEngine

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

GREEDY = SamplingParams(temperature=0)

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return lora_tiny.build(tmp_path_factory.mktemp("lora-serve"))


@pytest.fixture(scope="module", params=["reference", "cpu"])
def plans(request, models, tmp_path_factory):
    base, adapters, merged = models
    d = tmp_path_factory.mktemp(f"lora-plans-{request.param}")
    slotted = compile_model(base, d / "slots", progress=False, backend=request.param, max_loras=3,
                            max_lora_rank=8)
    refs = {name: compile_model(m, d / name, progress=False, backend=request.param) for name, m in merged.items()}
    refs[None] = compile_model(base, d / "base", progress=False, backend=request.param)
    return slotted, refs, adapters


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, rng.integers(4, 30)).tolist() for _ in range(n)]


def test_adapter_logits_and_greedy_match_the_merged_model_in_one_batch(plans):
    slotted, refs, adapters = plans
    engine = Engine.load(slotted, kv_tokens=4096)
    for name, path in adapters.items():
        engine.adapters.load(name, path)
    assert engine.plan.manifest["lora"]["max_loras"] == 3
    ps = prompts(6)
    which = [None, "alpha", "beta", "beta", None, "alpha"]
    # logits of whole prompts, all six in one step
    seqs = [engine.adapter_sequence(p, w) for p, w in zip(ps, which)]
    rows = engine.step([Chunk(s, len(s.tokens), "all") for s in seqs])
    for s in seqs:
        s.release()
    ref_engines = {w: Engine.load(p, kv_tokens=1024) for w, p in refs.items()}
    for p, w, got in zip(ps, which, rows):
        want = ref_engines[w].logits(p)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=str(w))
    # greedy decoding through the serving engine, mixed batch
    want = [list(generate(ref_engines[w], GenerationRequest(p, 16, GREEDY, ()))) for p, w in zip(ps, which)]
    serving = ServingEngine(engine, max_num_seqs=6)
    for i, (p, w) in enumerate(zip(ps, which)):
        serving.add(Request(f"r{i}", p, 16, GREEDY, ignore_eos=True, adapter=w))
    got = {f"r{i}": [] for i in range(6)}
    while serving.has_work:
        for o in serving.step():
            got[o.request_id] += o.token_ids
    assert [got[f"r{i}"] for i in range(6)] == want
    assert engine.pool.used_pages == 0


def test_prefix_cache_is_per_adapter(plans):
    slotted, refs, adapters = plans
    engine = Engine.load(slotted, kv_tokens=4096)
    engine.adapters.load("alpha", adapters["alpha"])
    p = prompts(1, seed=5)[0] + list(range(3, 40))       # more than two full pages
    a = engine.adapter_sequence(p, None)
    engine.prefill(a)
    a.register_pages()
    b = engine.adapter_sequence(p, "alpha")
    assert b.match_prefix() == 0                        # the base model's pages are not the adapter's
    c = engine.adapter_sequence(p, None)
    assert c.match_prefix() > 0
    for s in (a, b, c):
        s.release()


def test_bad_adapters_are_one_line_errors(plans, models, tmp_path):
    slotted, refs, adapters = plans
    engine = Engine.load(slotted, kv_tokens=256)
    with pytest.raises(RequestError, match="no LoRA adapter named 'nope'"):
        engine.adapter_sequence([1, 2], "nope")
    engine.adapters.load("alpha", adapters["alpha"])
    with pytest.raises(ReftError, match="already loaded"):
        engine.adapters.load("alpha", adapters["alpha"])
    with pytest.raises(ReftError, match="adapter_config.json"):
        engine.adapters.load("missing", tmp_path)
    plain = Engine.load(refs[None], kv_tokens=256)
    with pytest.raises(RequestError, match="--max-loras"):
        plain.adapter_sequence([1, 2], "alpha")
    small = compile_model(models[0], tmp_path / "small", progress=False, backend="reference", max_loras=1,
                          max_lora_rank=4, lora_targets=("q_proj", "v_proj"))
    eng = Engine.load(small, kv_tokens=256)
    with pytest.raises(ReftError, match="rank 8 exceeds"):
        eng.adapters.load("beta", adapters["beta"])
    with pytest.raises(ReftError, match="down_proj, which has no adapter slot"):
        eng.adapters.load("alpha", adapters["alpha"])
    with pytest.raises(ReftError, match="has no w9"):
        compile_model(models[0], tmp_path / "bad", progress=False, backend="reference", max_loras=1,
                      lora_targets=("w9",))
