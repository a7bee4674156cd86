"""config.json / generation_config.json loading: errors and the single rope layout."""
from paths import STORIES_HF
import json

import pytest

from reft.errors import ModelError
from reft.frontends.config import load_generation_config, load_hf_config

LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3_OUT = {"rope_type": "llama3", **LLAMA3}


def _cfg(tmp_path, obj, name="config.json"):
    (tmp_path / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return tmp_path


@pytest.mark.parametrize("cfg, theta, scaling", [
    # transformers >= 5
    ({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}, 500000.0, {"rope_type": "default"}),
    ({"rope_parameters": {"rope_theta": 500000, "rope_type": "llama3", **LLAMA3}}, 500000.0, LLAMA3_OUT),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, 10000.0, {"rope_type": "linear", "factor": 2.0}),
    # Hub layout
    ({}, 10000.0, {"rope_type": "default"}),
    ({"rope_theta": 1e6, "rope_scaling": None}, 1e6, {"rope_type": "default"}),
    ({"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}, 500000.0, LLAMA3_OUT),
    ({"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}}, 500000.0, LLAMA3_OUT),
    ({"rope_scaling": {"type": "linear", "factor": 4.0}}, 10000.0, {"rope_type": "linear", "factor": 4.0}),
    ({"rope_scaling": {"type": "yarn", "rope_type": "yarn", "factor": 4.0}}, 10000.0, {"rope_type": "yarn", "factor": 4.0}),
])
def test_rope_layouts_normalise(tmp_path, cfg, theta, scaling):
    out = load_hf_config(_cfg(tmp_path, {"hidden_size": 64, "eos_token_id": [1, 2], **cfg}))
    assert out["rope_theta"] == theta and isinstance(out["rope_theta"], float)
    assert out["rope_scaling"] == scaling
    assert "rope_parameters" not in out
    assert out["hidden_size"] == 64 and out["eos_token_id"] == [1, 2]  # everything else untouched


def test_both_layouts_agree(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = load_hf_config(_cfg(tmp_path / "a", {"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", **LLAMA3}}))
    b = load_hf_config(_cfg(tmp_path / "b", {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3}}))
    assert a == b


def test_per_layer_type_rope_parameters(tmp_path):
    cfg = {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}}
    out = load_hf_config(_cfg(tmp_path, cfg))
    assert out["rope_theta"] == 1e6 and out["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert out["rope_scaling_by_layer_type"]["sliding_attention"] == {"rope_theta": 10000.0, "rope_type": "default"}


def test_partial_rotary_factor_lifted(tmp_path):
    out = load_hf_config(_cfg(tmp_path, {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}))
    assert out["partial_rotary_factor"] == 0.5


def test_real_checkpoint_config():
    out = load_hf_config(str(STORIES_HF))
    assert out["rope_theta"] == 10000.0 and out["rope_scaling"] == {"rope_type": "default"}
    assert out["architectures"] == ["LlamaForCausalLM"] and out["vocab_size"] == 512


@pytest.mark.parametrize("text, words", [
    ("{", "invalid JSON"),
    ("[1]", "expected a JSON object"),
    ('{"rope_scaling": 3}', "rope_scaling must be an object"),
    ('{"rope_theta": "big"}', "rope_theta must be a positive number"),
    ('{"rope_parameters": 3}', "rope_parameters must be an object"),
])
def test_bad_config(tmp_path, text, words):
    with pytest.raises(ModelError, match=words) as e:
        load_hf_config(_cfg(tmp_path, text))
    assert "config.json" in str(e.value)


def test_missing_config(tmp_path):
    with pytest.raises(ModelError, match=r"config.json: no such file"):
        load_hf_config(tmp_path)
    with pytest.raises(ModelError, match="no such model directory"):
        load_hf_config(tmp_path / "nowhere")


@pytest.mark.parametrize("eos, want", [(2, [2]), ([2, 7], [2, 7]), (None, [])])
def test_generation_config(tmp_path, eos, want):
    obj = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, **({} if eos is None else {"eos_token_id": eos})}
    out = load_generation_config(_cfg(tmp_path, obj, "generation_config.json"))
    assert out["eos_token_ids"] == want
    assert (out["temperature"], out["top_p"], out["top_k"]) == (0.6, 0.9, 20)


def test_generation_config_optional_and_checked(tmp_path):
    assert load_generation_config(tmp_path) == {"eos_token_ids": []}
    _cfg(tmp_path, {"eos_token_id": "x"}, "generation_config.json")
    with pytest.raises(ModelError, match="generation_config.json: eos_token_id"):
        load_generation_config(tmp_path)
    _cfg(tmp_path, "{", "generation_config.json")
    with pytest.raises(ModelError, match="generation_config.json: invalid JSON"):
        load_generation_config(tmp_path)
