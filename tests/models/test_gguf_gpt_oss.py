"""GGUF files of GPT-OSS, written by the `gguf` package the way llama.cpp's convert_hf_to_gguf.py lays
them out (architecture `gpt-oss`; the experts' x @ W tensors transposed and gate / up de-interleaved
into ffn_gate_exps / ffn_up_exps / ffn_down_exps with `.bias` rows; attn_sinks.weight; the biased
router as ffn_gate_inp; post_attention_norm; YaRN as rope.scaling.* keys), compile to the plan of the
Hugging Face folder they came from: same config, same logits on the reference and cpu backends.
MXFP4 expert stacks (GPT-OSS's released format) are dequantized at load and match transformers with
the experts replaced by gguf's own MXFP4 round trip; Q8_0 stacks stay quantized, biases float."""
from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize, quantize
from gguf_util import copy_gguf
from hf_tiny import BASE, STORIES_TOKENIZER, hf_logits
from paths import SHARED_MODELS

from reft.compiler import compile_model
from reft.frontends.config import load_hf_config
from reft.frontends.gguf import open_gguf
from reft.frontends.safetensors import open_weights
from reft.runtime.engine import Engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORIES_GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"   # its tokenizer metadata is reused
pytestmark = pytest.mark.skipif(not STORIES_GGUF.is_file(), reason="shared/models/stories260K is absent")

U32, F32, STR = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
ARCH = "gpt-oss"
# llama.cpp's gpt-oss graph fixes the SwiGLU at alpha 1.702, limit 7 (transformers' defaults)
CONFIG = dict(num_hidden_layers=2, head_dim=16, intermediate_size=32, num_local_experts=6, num_experts_per_tok=3,
              sliding_window=6, max_position_embeddings=4096, tie_word_embeddings=False,
              rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 512})


def hf_model(folder):
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**BASE, **CONFIG})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".bias", "_bias")):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith("sinks"):
                p.add_(torch.randn_like(p) * 1.5)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_TOKENIZER / f, folder / f)
    return model


def converted(folder, c) -> dict:
    """GGUF name -> float32 array, as convert_hf_to_gguf.py's GptOssModel writes the checkpoint."""
    w = open_weights(folder)
    f = lambda name: np.array(w[name], np.float32)  # noqa: E731
    out = {"token_embd.weight": f("model.embed_tokens.weight"), "output_norm.weight": f("model.norm.weight"),
           "output.weight": f("lm_head.weight")}
    names = {"attn_norm.weight": "input_layernorm.weight",
             "post_attention_norm.weight": "post_attention_layernorm.weight",
             "attn_sinks.weight": "self_attn.sinks", "ffn_gate_inp.weight": "mlp.router.weight",
             "ffn_gate_inp.bias": "mlp.router.bias", "ffn_down_exps.bias": "mlp.experts.down_proj_bias"}
    for proj, gname in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
        for part in ("weight", "bias"):
            names[f"{gname}.{part}"] = f"self_attn.{proj}_proj.{part}"
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({f"blk.{i}.{g}": f(p + h) for g, h in names.items()})
        gate_up = f(p + "mlp.experts.gate_up_proj").transpose(0, 2, 1)          # (E, 2F, D), gate/up interleaved
        bias = f(p + "mlp.experts.gate_up_proj_bias")
        out.update({f"blk.{i}.ffn_gate_exps.weight": gate_up[:, ::2], f"blk.{i}.ffn_up_exps.weight": gate_up[:, 1::2],
                    f"blk.{i}.ffn_gate_exps.bias": bias[:, ::2], f"blk.{i}.ffn_up_exps.bias": bias[:, 1::2],
                    f"blk.{i}.ffn_down_exps.weight": f(p + "mlp.experts.down_proj").transpose(0, 2, 1)})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def write_gguf(model, folder, path, qtype=None):
    """The file, with the expert stacks in `qtype` (gguf's quantizer) if given; every name checked
    against llama.cpp's tensor list for gpt-oss."""
    c = model.config
    rp = c.rope_parameters
    kv = {f"{ARCH}.context_length": (c.max_position_embeddings, U32), f"{ARCH}.embedding_length": (c.hidden_size, U32),
          f"{ARCH}.block_count": (c.num_hidden_layers, U32), f"{ARCH}.feed_forward_length": (c.intermediate_size, U32),
          f"{ARCH}.expert_feed_forward_length": (c.intermediate_size, U32),
          f"{ARCH}.attention.head_count": (c.num_attention_heads, U32),
          f"{ARCH}.attention.head_count_kv": (c.num_key_value_heads, U32),
          f"{ARCH}.attention.key_length": (c.head_dim, U32), f"{ARCH}.attention.value_length": (c.head_dim, U32),
          f"{ARCH}.attention.layer_norm_rms_epsilon": (c.rms_norm_eps, F32),
          f"{ARCH}.attention.sliding_window": (c.sliding_window, U32),
          f"{ARCH}.rope.freq_base": (rp["rope_theta"], F32), f"{ARCH}.rope.scaling.type": ("yarn", STR),
          f"{ARCH}.rope.scaling.factor": (rp["factor"], F32),
          f"{ARCH}.rope.scaling.original_context_length": (rp["original_max_position_embeddings"], U32),
          f"{ARCH}.rope.scaling.yarn_beta_fast": (rp["beta_fast"], F32),
          f"{ARCH}.rope.scaling.yarn_beta_slow": (rp["beta_slow"], F32),
          f"{ARCH}.expert_count": (c.num_local_experts, U32), f"{ARCH}.expert_used_count": (c.num_experts_per_tok, U32)}
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.GPT_OSS]}
    tensors = []
    for name, w in converted(folder, c).items():
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", name.rsplit(".", 1)[0]) in known, name
        if qtype is not None and "_exps.weight" in name:
            tensors.append((name, quantize(w, qtype), qtype))
        else:
            tensors.append((name, w, None))
    src = GGUFReader(str(STORIES_GGUF))
    return copy_gguf(STORIES_GGUF, path, arch=ARCH, set_kv=kv,
                     drop_kv=[k for k in src.fields if k.startswith("llama.")],
                     drop_tensors={t.name for t in src.tensors}, add_tensors=tensors)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF folder, GGUF of the same float weights, the HF model)."""
    d = tmp_path_factory.mktemp("gpt_oss")
    model = hf_model(d / "hf")
    return d / "hf", write_gguf(model, d / "hf", d / "f32.gguf"), model


def prompt(n: int, seed: int) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(3, 512, n - 1).tolist()


def test_config_equals_the_hf_folder(pair):
    """The same model config but for the expert layout (float32 roundings of the file's floats aside)."""
    hf, path, _ = pair
    g = open_gguf(path)
    assert g.family.ARCHITECTURES == ("GptOssForCausalLM",)
    got = dataclasses.asdict(g.family.Config.from_hf(g.hf_config))
    want = dataclasses.asdict(g.family.Config.from_hf(load_hf_config(hf)))
    assert got.pop("split_experts") and not want.pop("split_experts")
    assert got.keys() == want.keys()
    for k in got:
        pairs = zip(dict(got[k]).items(), dict(want[k]).items()) if k == "rope" else [((k, got[k]), (k, want[k]))]
        for (ka, a), (kb, b) in pairs:
            assert ka == kb and ((np.float32(a) == np.float32(b)) if isinstance(a, float) else a == b), (ka, a, kb, b)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_same_logits_as_the_hf_folder_plan(pair, backend, tmp_path):
    hf, path, _ = pair
    a = Engine.load(compile_model(path, tmp_path / "gguf", backend=backend, progress=False))
    b = Engine.load(compile_model(hf, tmp_path / "hf", backend=backend, progress=False))
    graph = (tmp_path / "gguf" / "graphs" / "forward.ir").read_text()
    assert "gate_proj+up_proj" in graph                 # the split stacks fused back (fuse_projections)
    for n in (32, 5):
        ids = prompt(n, n)
        np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-5)


def test_mxfp4_experts_are_dequantized_at_load(pair, tmp_path):
    """The plan of an MXFP4 file holds float experts and equals transformers with each expert matrix
    replaced by gguf's MXFP4 quantize-dequantize round trip, on both backends."""
    hf, _, model = pair
    path = write_gguf(model, hf, tmp_path / "mxfp4.gguf", GGMLQuantizationType.MXFP4)
    g = open_gguf(path)
    assert g.source_types["MXFP4"] == 3 * model.config.num_hidden_layers
    m = _round_tripped(model, GGMLQuantizationType.MXFP4)
    ids = prompt(24, 9)
    want = hf_logits(m, ids)
    for backend in ("reference", "cpu"):
        plan = compile_model(path, tmp_path / backend, backend=backend, progress=False)
        graph = (plan / "graphs" / "forward.ir").read_text()
        assert "float32[6,64,64] {name='model.layers.0.mlp.experts.gate_proj+up_proj.weight'}" in graph
        got = Engine.load(plan).logits(ids)
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), backend


def test_q8_0_experts_stay_quantized_with_float_biases(pair, tmp_path):
    """Q8_0 stacks stay [E, N, K] blocks in the plan, their bias rows float32; the cpu kernels give the
    reference backend's logits and greedy tokens."""
    from reft.runtime.generate import GenerationRequest, generate
    from reft.runtime.sampler import SamplingParams

    hf, _, model = pair
    path = write_gguf(model, hf, tmp_path / "q8.gguf", GGMLQuantizationType.Q8_0)
    engines = {b: Engine.load(compile_model(path, tmp_path / b, backend=b, progress=False))
               for b in ("reference", "cpu")}
    graph = (tmp_path / "cpu" / "graphs" / "forward.ir").read_text()
    assert "q8_0[6,64,64] {name='model.layers.0.mlp.experts.gate_proj+up_proj.weight'}" in graph
    assert "float32[6,64] {name='model.layers.0.mlp.experts.gate_proj+up_proj.bias'}" in graph
    assert graph.count("expert_glu(") == model.config.num_hidden_layers
    ids = prompt(23, 7)
    ref, cpu = engines["reference"].logits(ids), engines["cpu"].logits(ids)
    assert np.abs(cpu - ref).max() < 1e-4 * np.abs(ref).max()
    req = lambda: GenerationRequest(ids, 16, SamplingParams(temperature=0.0))  # noqa: E731
    assert list(generate(engines["cpu"], req())) == list(generate(engines["reference"], req()))


def _round_tripped(model, qtype):
    """A copy of the HF model whose expert matrices went through gguf's quantizer and back, in the
    converter's [E, out, in] layout."""
    import copy

    def rt(w: np.ndarray) -> np.ndarray:    # (E, in, out) as stored -> round trip over rows of `in`
        t = np.ascontiguousarray(w.transpose(0, 2, 1))
        return np.ascontiguousarray(dequantize(quantize(t, qtype), qtype).reshape(t.shape).transpose(0, 2, 1))

    m = copy.deepcopy(model)
    with torch.no_grad():
        for layer in m.model.layers:
            for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                p.copy_(torch.from_numpy(rt(p.numpy())))
    return m
