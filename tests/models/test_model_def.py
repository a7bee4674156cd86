"""A model definition given as a file (`--model-def models/phi3.py`: the shipped Phi-3 family needs
no imports, so its file is also a valid --model-def) against transformers' Phi3ForCausalLM on a tiny
random-weight checkpoint, through compile_model + Engine.

Also: a folder whose architecture reft does not ship is refused without a definition, and a
definition file that lacks `build` is rejected, both as a one-line ModelError.
"""
from __future__ import annotations
from paths import STORIES_HF

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from reft.compiler import compile_model  # noqa: E402
from reft.errors import ModelError  # noqa: E402
from reft.runtime.engine import Engine  # noqa: E402
from reft.runtime.generate import GenerationRequest, generate  # noqa: E402
from reft.runtime.sampler import SamplingParams  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PHI3_DEF = REPO / "models" / "phi3.py"
TOKENIZER_DIR = Path(str(STORIES_HF))
VOCAB, PROMPT_LEN, NEW_TOKENS = 512, 32, 16

VARIANTS = {
    "plain": {},
    # partial rotary, a window shorter than the prompt, the embedding reused as the LM head
    "partial_rotary_window_tied": {"partial_rotary_factor": 0.5, "sliding_window": 12,
                                   "tie_word_embeddings": True},
}


def make_phi3(folder: Path, seed: int = 0, **extra) -> torch.nn.Module:
    """A tiny float32 Phi3ForCausalLM saved into `folder` with the stories260K tokenizer."""
    torch.manual_seed(seed)
    cfg = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.2,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, **extra)
    model = transformers.Phi3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # std 0.2 everywhere, so logits are far from uniform
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def phi3(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"phi3-{request.param}")
    model = make_phi3(folder, **VARIANTS[request.param])
    plan = compile_model(folder, folder.parent / f"{folder.name}-plan", model_def=PHI3_DEF, progress=False)
    return model, folder, Engine.load(plan)


def prompt() -> list[int]:
    return np.random.default_rng(1).integers(3, VOCAB, PROMPT_LEN).tolist()


def test_logits_match_transformers(phi3):
    model, _, engine = phi3
    ids = prompt()
    got, want = engine.logits(ids), hf_logits(model, ids)
    assert got.shape == want.shape == (PROMPT_LEN, VOCAB)
    assert want.std() > 1.0, "weights too small: logits near uniform make the comparison weak"
    assert np.abs(got - want).max() < 1e-4


def test_greedy_tokens_match_transformers(phi3):
    model, _, engine = phi3
    ids = prompt()
    want = []
    for _ in range(NEW_TOKENS):  # transformers: full forward each step, argmax of the last row
        want.append(int(hf_logits(model, ids + want)[-1].argmax()))
    req = GenerationRequest(ids, max_tokens=NEW_TOKENS, sampling=SamplingParams(temperature=0.0))
    assert list(generate(engine, req)) == want   # reft: prefill, then one cached token per step


def test_plan_records_the_split_projections(phi3):
    _, _, engine = phi3
    m = engine.plan.manifest
    assert m["model"]["architecture"] == "Phi3ForCausalLM"
    if m["backend"]["name"] == "reference":
        assert m["ops"]["split"] == 2 * 2      # qkv and gate_up in each of the 2 layers
    else:                                      # codegen backends fold the splits into fused kernels
        assert m["ops"]["qkv_rope"] == 2 and m["ops"]["linear_glu"] == 2 and "split" not in m["ops"]
    assert m["ops"]["paged_attention"] == 2


def test_unshipped_architecture_without_model_def(phi3, tmp_path):
    """The same checkpoint under an architecture name reft does not ship."""
    _, folder, _ = phi3
    renamed = tmp_path / "renamed"
    shutil.copytree(folder, renamed)
    cfg = json.loads((renamed / "config.json").read_text())
    cfg["architectures"] = ["MyPhi3ForCausalLM"]
    (renamed / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as e:
        compile_model(renamed, tmp_path / "plan", progress=False)
    msg = str(e.value)
    assert "MyPhi3ForCausalLM" in msg
    assert "supported:" in msg and "LlamaForCausalLM" in msg and "Phi3ForCausalLM" in msg
    assert "--model-def" in msg
    assert not (tmp_path / "plan").exists()
    assert compile_model(renamed, tmp_path / "plan", model_def=PHI3_DEF, backend="reference", progress=False).is_dir()


def test_model_def_without_build(phi3, tmp_path):
    _, folder, _ = phi3
    bad = tmp_path / "nobuild.py"
    bad.write_text(PHI3_DEF.read_text().split("\ndef build(")[0])
    with pytest.raises(ModelError, match=r"missing build"):
        compile_model(folder, tmp_path / "plan", model_def=bad, progress=False)
    assert not (tmp_path / "plan").exists()
