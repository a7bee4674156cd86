"""GGUF files of Mixtral and Qwen3-MoE, written by the `gguf` package the way llama.cpp's
convert_hf_to_gguf.py lays them out (Mixtral as architecture `llama` with `llama.expert_count`, q/k
rows permuted for llama.cpp's rotary; each layer's experts as stacked `ffn_gate_exps` / `ffn_up_exps`
/ `ffn_down_exps` tensors; Qwen3-MoE's `attn_q_norm` / `attn_k_norm`), compile to the plan of the
Hugging Face folder they came from: same config, same logits on the reference and cpu backends.
Expert stacks in Q8_0 / Q4_0 stay quantized in the plan, the cpu kernels match the reference
backend on them, and the Q8_0 plan stays close to the float one."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from gguf import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import quantize
from gguf_util import copy_gguf
from hf_tiny import BASE, STORIES_TOKENIZER
from paths import SHARED_MODELS

from reft.compiler import compile_model
from reft.frontends.architectures import find_family
from reft.frontends.config import load_hf_config
from reft.frontends.gguf import open_gguf
from reft.frontends.safetensors import open_weights
from reft.runtime.engine import Engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORIES_GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"   # its tokenizer metadata is reused
pytestmark = pytest.mark.skipif(not STORIES_GGUF.is_file(), reason="shared/models/stories260K is absent")

U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
# llama.cpp architecture -> (config class, model class, overrides): every layer sparse (llama.cpp has
# no dense layers in these architectures), renormalised top-k (its graphs always renormalise)
MODELS = {
    "llama": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2,
                                                          tie_word_embeddings=False)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=24, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=64, norm_topk_prob=True,
        tie_word_embeddings=False)),
}


def hf_model(arch: str, folder):
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


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: q/k rows interleaved for llama.cpp's rotary."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(arch: str, family, folder, c, qtype=None) -> list:
    """(GGUF name, array, GGML type) of the checkpoint in `folder` by the family's table, each name
    checked against llama.cpp's tensor list for the architecture; expert stacks in `qtype` if given."""
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)]}
    weights = open_weights(folder)                 # a `*` name is the stack of the per-expert tensors
    out = []
    for g, h in family.GGUF_TENSORS.items():
        assert g.removesuffix(".weight").replace("{i}", "{bid}") in known, g
        for i in range(c.num_hidden_layers) if "{i}" in g else [None]:
            name = h.format(i=i)
            if name not in weights:                # e.g. biases the model does not have
                continue
            w = np.array(weights[name], np.float32)
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                w = permute(w, c.num_attention_heads if "q_proj" in name else c.num_key_value_heads)
            if qtype is not None and "_exps" in g:
                out.append((g.format(i=i), quantize(w, qtype), qtype))
            else:
                out.append((g.format(i=i), w, None))
    return out


def write_like_convert_hf_to_gguf(arch: str, model, family, folder, path, qtype=None):
    c = model.config
    kv = {f"{arch}.context_length": (c.max_position_embeddings, U32),
          f"{arch}.embedding_length": (c.hidden_size, U32), f"{arch}.block_count": (c.num_hidden_layers, U32),
          f"{arch}.feed_forward_length": (c.intermediate_size, U32),
          f"{arch}.attention.head_count": (c.num_attention_heads, U32),
          f"{arch}.attention.head_count_kv": (c.num_key_value_heads, U32),
          f"{arch}.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, F32),
          f"{arch}.rope.freq_base": (c.rope_parameters["rope_theta"], F32),
          f"{arch}.expert_count": (c.num_local_experts, U32),
          f"{arch}.expert_used_count": (c.num_experts_per_tok, U32)}
    if arch == "qwen3moe":
        kv.update({"qwen3moe.expert_feed_forward_length": (c.moe_intermediate_size, U32),
                   "qwen3moe.attention.key_length": (c.head_dim, U32),
                   "qwen3moe.attention.value_length": (c.head_dim, U32)})
    src = GGUFReader(str(STORIES_GGUF))
    return copy_gguf(STORIES_GGUF, path, arch=arch, set_kv=kv,
                     drop_kv=[k for k in src.fields if k.startswith("llama.")],
                     drop_tensors={t.name for t in src.tensors},
                     add_tensors=gguf_tensors(arch, family, folder, c, qtype))


@pytest.fixture(scope="module", params=sorted(MODELS))
def pair(request, tmp_path_factory):
    """(architecture, HF folder, GGUF file of the same weights, the HF model)."""
    arch = request.param
    d = tmp_path_factory.mktemp(arch)
    model = hf_model(arch, d / "hf")
    family = find_family([MODELS[arch][1]])
    return arch, d / "hf", write_like_convert_hf_to_gguf(arch, model, family, d / "hf", d / f"{arch}.gguf"), model


def test_config_equals_the_hf_folder(pair):
    """The family by `expert_count` (a `llama` file with experts is Mixtral), the same model config
    (but for float32 roundings of the file's floats)."""
    arch, hf, path, _ = pair
    g = open_gguf(path)
    assert g.family.ARCHITECTURES == (MODELS[arch][1],)
    got = dataclasses.asdict(g.family.Config.from_hf(g.hf_config))
    want = dataclasses.asdict(g.family.Config.from_hf(load_hf_config(hf)))
    assert got.keys() == want.keys()
    for k in got:
        a, b = got[k], want[k]
        assert (np.float32(a) == np.float32(b)) if isinstance(a, float) else a == b, (k, a, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_same_logits_as_the_hf_folder_plan(pair, backend, tmp_path):
    arch, hf, path, _ = pair
    a = Engine.load(compile_model(path, tmp_path / "gguf", backend=backend, progress=False))
    b = Engine.load(compile_model(hf, tmp_path / "hf", backend=backend, progress=False))
    for n in (32, 5):
        ids = [1] + np.random.default_rng(n).integers(3, 512, n - 1).tolist()
        np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantized_experts_stay_quantized(pair, qtype, tmp_path):
    """Expert stacks in llama.cpp blocks: kept as [E, N, K] quantized params (gate and up still fuse),
    the cpu kernels give the reference backend's logits and greedy tokens, and Q8_0 stays near the
    float plan."""
    from reft.runtime.generate import GenerationRequest, generate
    from reft.runtime.sampler import SamplingParams

    arch, hf, _, model = pair
    family = find_family([MODELS[arch][1]])
    path = write_like_convert_hf_to_gguf(arch, model, family, hf, tmp_path / "q.gguf", GGMLQuantizationType[qtype])
    engines = {b: Engine.load(compile_model(path, tmp_path / b, backend=b, progress=False))
               for b in ("reference", "cpu")}
    graph = (tmp_path / "cpu" / "graphs" / "forward.ir").read_text()
    assert f"{qtype.lower()}[" in graph and "experts.*" in graph
    assert graph.count("expert_glu(") == model.config.num_hidden_layers
    ids = [1] + np.random.default_rng(7).integers(3, 512, 23).tolist()
    ref, cpu = engines["reference"].logits(ids), engines["cpu"].logits(ids)
    # activations are rounded to int16 per block: a last-bit difference upstream can move a code
    assert np.abs(cpu - ref).max() < 1e-4 * np.abs(ref).max()
    req = lambda: GenerationRequest(ids, 16, SamplingParams(temperature=0.0))  # noqa: E731
    assert list(generate(engines["cpu"], req())) == list(generate(engines["reference"], req()))
    if qtype == "Q8_0":
        full = Engine.load(compile_model(hf, tmp_path / "float", backend="reference", progress=False)).logits(ids)
        assert np.linalg.norm(ref - full) < 0.02 * np.linalg.norm(full)
