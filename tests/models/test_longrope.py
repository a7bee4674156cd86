"""Phi-3's longrope against transformers where the parity suite's case (tests/hf_tiny.py, original
context 6: always the long factors) does not reach: a model with an original context of 16, prompts
on both sides of it, and both in one batch (each sequence picks its factors by its own extent),
on the reference and cpu backends. Also the Hub's legacy `rope_scaling: {"type": "su"}` layout."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from hf_tiny import BASE, STORIES_TOKENIZER, hf_logits

from reft.compiler import compile_model
from reft.frontends.config import load_hf_config
from reft.runtime.engine import Chunk, Engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ORIG = 16
ROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.5, 2.0, 4.0, 1.0, 1.0, 2.0, 3.0],
        "long_factor": [1.0, 4.0, 9.0, 20.0, 30.0, 50.0, 70.0, 90.0]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3-longrope16") / "hf"
    cfg = transformers.Phi3Config(**{**BASE, "original_max_position_embeddings": ORIG, "pad_token_id": None,
                                     "rope_parameters": ROPE})
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_TOKENIZER / f, folder / f)
    return folder, hf


@pytest.fixture(scope="module", params=["reference", "cpu"])
def engine(request, model, tmp_path_factory):
    plan = compile_model(model[0], tmp_path_factory.mktemp("plan") / request.param, backend=request.param,
                         progress=False)
    return Engine.load(plan)


def ids(n, seed):
    return [1] + np.random.default_rng(seed).integers(3, 512, n - 1).tolist()


@pytest.mark.parametrize("n", [10, ORIG, ORIG + 1, 30])
def test_one_prompt_either_side_of_the_original_context(model, engine, n):
    prompt = ids(n, n)
    assert np.abs(engine.logits(prompt) - hf_logits(model[1], prompt)).max() < 1e-4


def test_short_and_long_sequences_in_one_batch(model, engine):
    """Each sequence's factors follow its own extent in the step, as transformers' one-sequence call."""
    a, b = ids(9, 1), ids(27, 2)
    sa, sb = engine.new_sequence(a), engine.new_sequence(b)
    try:
        la, lb = engine.step([Chunk(sa, len(a), "all"), Chunk(sb, len(b), "all")])
    finally:
        sa.release()
        sb.release()
    assert np.abs(la - hf_logits(model[1], a)).max() < 1e-4
    assert np.abs(lb - hf_logits(model[1], b)).max() < 1e-4


def test_legacy_su_layout_reads_the_same(model, tmp_path):
    """Hub checkpoints: rope_theta + rope_scaling {"type": "su", ...} and a top-level original context."""
    from reft_models.phi3 import Config

    c = json.loads((model[0] / "config.json").read_text())
    rp = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rp.pop("rope_theta")
    c["rope_scaling"] = {"type": "su", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps(c))
    assert Config.from_hf(load_hf_config(legacy)) == Config.from_hf(load_hf_config(model[0]))
