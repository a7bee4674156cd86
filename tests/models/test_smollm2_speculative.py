"""Speculative decoding on the real SmolLM2-135M-Instruct: the float32 plan (the Q4_1 GGUF
dequantized into a Hugging Face folder, as tools/bench_models.py builds it) decodes greedily with
prompt lookup and with the Q4_1 plan as its draft, and must give exactly the ids it gives alone,
for 10 chat prompts."""
from __future__ import annotations

import sys

import pytest

from paths import ROOT, SHARED_MODELS, SMOLLM2_GGUF
from reft.compiler import compile_model
from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams
from reft.runtime.serving import Request, ServingEngine
from reft.runtime.speculative import ModelDrafter, NgramDrafter

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(SMOLLM2_GGUF is None, reason="no SmolLM2 GGUF: run tools/fetch_smollm2.py")]

PROMPTS = [
    "Repeat this sentence exactly: the quick brown fox jumps over the lazy dog.",
    "Fix the spelling in: 'I recieved teh package yesterday and it was broken.'",
    "Summarize: The city council met on Tuesday to discuss the new park. The park will have a playground,"
    " a pond and a walking trail. Construction starts in May.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Translate 'good morning' into Spanish.",
    "def add(a, b):\n    return a + b\n\nRewrite this Python function with type hints.",
    "Give me a short tip for sleeping better.",
    "Copy this list: apples, pears, plums, cherries, grapes.",
]


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_models import build_smollm2_hf

    d = tmp_path_factory.mktemp("smol-spec")
    build_smollm2_hf(SMOLLM2_GGUF, d / "hf", SHARED_MODELS / "smollm2-135m-instruct")
    f32 = compile_model(d / "hf", d / "f32", progress=False)
    q41 = compile_model(SMOLLM2_GGUF, d / "q41", progress=False)
    return f32, q41


@pytest.fixture(scope="module")
def prompts(plans):
    tok = Engine.load(plans[1], kv_tokens=64).tokenizer
    return [tok.encode(tok.render_chat([{"role": "user", "content": p}]), add_special_tokens=False) for p in PROMPTS]


def test_greedy_ids_identical_with_prompt_lookup_and_a_draft_model(plans, prompts):
    target = Engine.load(plans[0], kv_tokens=2048)
    greedy = SamplingParams(temperature=0)
    want = [list(generate(target, GenerationRequest(p, 32, greedy, tuple(target.tokenizer.eos_token_ids))))
            for p in prompts]
    draft = Engine.load(plans[1], kv_tokens=2048, prefix_caching=False)
    for drafter in (NgramDrafter(4), ModelDrafter(draft, 4, 49152, target.tokenizer)):
        serving = ServingEngine(target, max_num_seqs=1, drafter=drafter, spec_tokens=4)
        for i, p in enumerate(prompts):
            serving.add(Request(f"r{i}", p, 32, greedy))
            got = []
            while serving.has_work:
                for o in serving.step():
                    got += o.token_ids
            assert got == want[i], (drafter.name, PROMPTS[i])
        assert serving.spec.accepted > 0, drafter.name
