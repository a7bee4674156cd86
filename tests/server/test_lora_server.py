"""LoRA adapters per request through the server (`reft run PLAN --serve --lora NAME=DIR`) with the
official openai client: /v1/models lists the adapters beside the base model, and concurrent requests
for two adapters and the base model (one batch) each give the merged model's greedy text."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import lora_tiny
import openai
import pytest
from server_util import Server

from reft.compiler import compile_model
from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora-server")
    base, adapters, merged = lora_tiny.build(d / "models")
    slotted = compile_model(base, d / "slots", progress=False, max_loras=2, max_lora_rank=8)
    refs = {name: compile_model(m, d / name, progress=False) for name, m in merged.items()}
    refs[None] = compile_model(base, d / "base", progress=False)
    args = [a for name, path in adapters.items() for a in ("--lora", f"{name}={path}")]
    server = Server(slotted, d, "--model-name", "tiny", *args)
    yield server, refs, adapters
    server.stop()


def test_models_lists_adapters_and_unknown_is_404(setup):
    server, _, adapters = setup
    client = server.client()
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {"tiny", "alpha", "beta"}
    assert cards["alpha"].parent == "tiny" and cards["alpha"].root == str(adapters["alpha"])
    assert client.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError, match="serves `tiny`, `alpha`, `beta`"):
        client.completions.create(model="gamma", prompt="hi", max_tokens=2)


def test_requests_for_adapters_and_base_share_a_batch(setup):
    server, refs, _ = setup
    client = server.client()
    prompt = "Once upon a time"
    want = {}
    for name, plan in refs.items():
        eng = Engine.load(plan, kv_tokens=256)
        tok = eng.tokenizer
        ids = tok.encode(prompt)
        out = list(generate(eng, GenerationRequest(ids, 12, SamplingParams(temperature=0), ())))
        want[name] = tok.decode(ids + out, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
    jobs = [None, "alpha", "beta"] * 3

    def ask(model):
        r = client.completions.create(model=model or "tiny", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    assert got == [want[m] for m in jobs]
    assert len(set(want.values())) == 3     # the adapters do change the output
