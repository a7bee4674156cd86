"""GPT-OSS as OpenAI released it: a Hugging Face folder whose expert tensors are transformers' MXFP4
pairs (`gate_up_proj_blocks` / `_scales`, `down_proj_blocks` / `_scales`, `quant_method: mxfp4`).
The safetensors frontend reads each pair as the float tensor transformers' own loader makes of it,
so the plan matches transformers with those dequantized experts, on the reference and cpu backends."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hf_tiny import hf_logits, make_model

from reft.compiler import compile_model
from reft.errors import ModelError
from reft.frontends.safetensors import open_weights, write_safetensors
from reft.runtime.engine import Engine

torch = pytest.importorskip("torch")
mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")

PACKED = ("gate_up_proj", "down_proj")


def pack_experts(folder, rng) -> dict:
    """Rewrite the folder's expert matrices as random MXFP4 pairs of the same logical shapes; returns
    {checkpoint name: (blocks, scales)}."""
    w = open_weights(folder)
    tensors, pairs = {}, {}
    for name in list(w):
        if name.endswith(PACKED):
            E, K, N = w.info(name)[1]                                   # stored as x @ W: [E, in, out]
            blocks = rng.integers(0, 256, (E, N, K // 32, 16), dtype=np.uint8)
            scales = rng.integers(122, 127, (E, N, K // 32), dtype=np.uint8)   # 2^-5 .. 2^-1 times FP4 values
            pairs[name] = (blocks, scales)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = np.array(w[name])
    w.close()
    write_safetensors(folder / "model.safetensors",
                      [(n, str(a.dtype), a.shape, lambda a=a: a) for n, a in tensors.items()])
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    return pairs


def with_dequantized_experts(hf, pairs: dict):
    """The transformers model with each expert tensor set to transformers' own MXFP4 dequantization."""
    with torch.no_grad():
        for name, (blocks, scales) in pairs.items():
            w = mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                                 dtype=torch.float32)
            hf.get_parameter(name).copy_(w)
    return hf


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder, hf = make_model("gpt-oss-sinks-yarn", tmp_path_factory.mktemp("hf") / "hf")
    return folder, with_dequantized_experts(hf, pack_experts(folder, np.random.default_rng(0)))


def test_pairs_read_as_the_float_tensors(packed):
    folder, hf = packed
    w = open_weights(folder)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert name in w and name not in list(w)                          # a virtual name over the pair
    assert w.info(name) == ("float32", tuple(hf.get_parameter(name).shape))
    np.testing.assert_array_equal(w[name], hf.get_parameter(name).detach().numpy())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_plan_matches_transformers(packed, backend, tmp_path):
    folder, hf = packed
    engine = Engine.load(compile_model(folder, tmp_path / "plan", backend=backend, progress=False))
    ids = [1] + np.random.default_rng(3).integers(3, 512, 27).tolist()
    want = hf_logits(hf, ids)
    assert np.abs(engine.logits(ids) - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_a_broken_pair_is_one_error(packed, tmp_path):
    folder, _ = packed
    w = open_weights(folder)
    tensors = {n: np.array(w[n]) for n in w}
    w.close()
    bad = "model.layers.0.mlp.experts.down_proj_scales"
    tensors[bad] = tensors[bad][..., :-1]                                  # one block short
    d = tmp_path / "bad"
    d.mkdir()
    write_safetensors(d / "model.safetensors", [(n, str(a.dtype), a.shape, lambda a=a: a) for n, a in tensors.items()])
    with pytest.raises(ModelError, match="down_proj: MXFP4 blocks"):
        open_weights(d).info("model.layers.0.mlp.experts.down_proj")
