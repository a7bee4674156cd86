"""GGUF files of Gemma 2, Gemma 3 and Phi-3, written by the `gguf` package the way llama.cpp's
convert_hf_to_gguf.py lays them out (tensor names from gguf.constants, Gemma norms stored as 1 + w,
Phi-3's fused attn_qkv / ffn_up and its longrope factors as rope_factors_long/short tensors), compile
to the plan of the Hugging Face folder they came from: same config, same logits on the reference
and cpu backends.

The tiny models use what llama.cpp's loaders assume: Gemma's attention scale head_dim ** -0.5
(query_pre_attn_scalar = head_dim) and Gemma 3's one global layer in six."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, GGUFReader, GGUFValueType
from gguf_util import copy_gguf
from hf_tiny import BASE, STORIES_TOKENIZER
from paths import SHARED_MODELS

from reft.compiler import compile_model
from reft.frontends.architectures import find_family
from reft.frontends.config import load_hf_config
from reft.frontends.gguf import open_gguf
from reft.runtime.engine import Engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORIES_GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"   # its tokenizer metadata is reused
pytestmark = pytest.mark.skipif(not STORIES_GGUF.is_file(), reason="shared/models/stories260K is absent")

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
MODELS = {
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        num_hidden_layers=3, head_dim=24, query_pre_attn_scalar=24, sliding_window=10, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=10, final_logit_softcapping=4.0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}},
        tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        partial_rotary_factor=0.5, original_max_position_embeddings=16, pad_token_id=None, tie_word_embeddings=False,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.25, 1.5, 2.0],
                         "long_factor": [1.0, 3.0, 6.0, 12.0]})),
}


def hf_model(arch: str, folder):
    """A tiny random-weight float32 model of MODELS[arch] saved into `folder` with the stories260K tokenizer."""
    cfg_cls, model_cls, over = MODELS[arch]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**{**BASE, **over})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_TOKENIZER / f, folder / f)
    return model


def gguf_names(arch: str, family, n_layers: int) -> dict[str, str]:
    """HF weight name -> GGUF name by the family's table, each checked against llama.cpp's tensor
    list for the architecture (gguf.constants)."""
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)]}
    out = {}
    for g, h in family.GGUF_TENSORS.items():
        assert g.removesuffix(".weight").replace("{i}", "{bid}") in known, g
        for i in range(n_layers) if "{i}" in g else [None]:
            out[h.format(i=i)] = g.format(i=i)
    return out


def write_like_convert_hf_to_gguf(arch: str, model, family, path):
    c = model.config
    kv = {f"{arch}.context_length": (c.max_position_embeddings, U32),
          f"{arch}.embedding_length": (c.hidden_size, U32), f"{arch}.block_count": (c.num_hidden_layers, U32),
          f"{arch}.feed_forward_length": (c.intermediate_size, U32),
          f"{arch}.attention.head_count": (c.num_attention_heads, U32),
          f"{arch}.attention.head_count_kv": (c.num_key_value_heads, U32),
          f"{arch}.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, F32)}
    names = gguf_names(arch, family, c.num_hidden_layers)
    tensors = []
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        w = w.numpy().astype(np.float32)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            w = w + np.float32(1.0)                               # Gemma's RMSNorm scale, as the converter stores it
        tensors.append((names[name], w, None))
    if arch.startswith("gemma"):
        kv.update({f"{arch}.attention.key_length": (c.head_dim, U32),
                   f"{arch}.attention.value_length": (c.head_dim, U32),
                   f"{arch}.attention.sliding_window": (c.sliding_window, U32),
                   f"{arch}.final_logit_softcapping": (c.final_logit_softcapping, F32)})
    if arch == "gemma2":
        kv["gemma2.attn_logit_softcapping"] = (c.attn_logit_softcapping, F32)
    if arch == "gemma3":                     # global layers' rope; sliding ones: llama.cpp's fixed base 10000
        full = c.rope_parameters["full_attention"]
        kv.update({"gemma3.rope.freq_base": (full["rope_theta"], F32),
                   "gemma3.rope.scaling.type": (full["rope_type"], GGUFValueType.STRING),
                   "gemma3.rope.scaling.factor": (full["factor"], F32)})
    if arch == "phi3":
        rp = c.rope_parameters
        orig, head_dim = c.original_max_position_embeddings, c.hidden_size // c.num_attention_heads
        scale = c.max_position_embeddings / orig
        kv.update({"phi3.rope.scaling.original_context_length": (orig, U32),
                   "phi3.rope.dimension_count": (int(head_dim * rp["partial_rotary_factor"]), U32),
                   "phi3.rope.freq_base": (rp["rope_theta"], F32), "phi3.attention.sliding_window": (0, U32),
                   "phi3.rope.scaling.attn_factor": (float((1 + np.log(scale) / np.log(orig)) ** 0.5), F32)})
        tensors += [("rope_factors_long.weight", np.array(rp["long_factor"], np.float32), None),
                    ("rope_factors_short.weight", np.array(rp["short_factor"], np.float32), None)]
    src = GGUFReader(str(STORIES_GGUF))
    return copy_gguf(STORIES_GGUF, path, arch=arch, set_kv=kv,
                     drop_kv=[k for k in src.fields if k.startswith("llama.")],
                     drop_tensors={t.name for t in src.tensors}, add_tensors=tensors)


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """(architecture, HF folder, GGUF file of the same weights)."""
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    model = hf_model(arch, d / "hf")
    family = find_family([MODELS[arch][1]])
    return arch, d / "hf", write_like_convert_hf_to_gguf(arch, model, family, d / f"{arch}.gguf")


def test_config_equals_the_hf_folder(pair):
    """The same model config, but for float32 roundings of the file's floats and the norms' offset
    (the file holds 1 + w)."""
    arch, hf, path = pair
    g = open_gguf(path)
    assert g.family.ARCHITECTURES == (MODELS[arch][1],)
    got = dataclasses.asdict(g.family.Config.from_hf(g.hf_config))
    want = dataclasses.asdict(g.family.Config.from_hf(load_hf_config(hf)))
    if arch.startswith("gemma"):
        assert got.pop("norm_offset") == 0.0 and want.pop("norm_offset") == 1.0
    assert got.keys() == want.keys()
    for k in got:
        assert _close(got[k], want[k]), (k, got[k], want[k])


def _close(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return np.float32(a) == np.float32(b)
    return a == b


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_same_logits_as_the_hf_folder_plan(pair, backend, tmp_path):
    """A prompt longer than the windows and Phi-3's original context, and a short one (Phi-3's short factors)."""
    arch, hf, path = pair
    a = Engine.load(compile_model(path, tmp_path / "gguf", backend=backend, progress=False))
    b = Engine.load(compile_model(hf, tmp_path / "hf", backend=backend, progress=False))
    for n in (32, 9):
        ids = [1] + np.random.default_rng(n).integers(3, 512, n - 1).tolist()
        np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-5)
