"""GGUF files of DeepSeek-V3 (llama.cpp architecture `deepseek2`), written by the `gguf` package the
way llama.cpp's convert_hf_to_gguf.py lays them out, compile to the plan of the Hugging Face folder
they came from: same config, same logits on the reference and cpu backends.

Two layouts: newer converters split kv_b_proj into attn_k_b [H, kv_lora_rank, qk_nope] (each head
transposed) and attn_v_b [H, v_head_dim, kv_lora_rank], write the MLA head count as 1 and the
key / value lengths of the latent cache (key_length_mla / value_length_mla for the heads); older ones
keep attn_kv_b and write the heads' lengths. Experts as stacks (ffn_*_exps), shared experts as
ffn_*_shexp, the routing bias as exp_probs_b.bias, YaRN's mscale as rope.scaling.yarn_log_multiplier.
Block-quantized expert stacks stay quantized; a quantized attn_kv_b is dequantized for the absorbed
weights."""
from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, GGUFValueType
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
from reft.runtime.kv_cache import PagePool

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

STORIES_GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"   # its tokenizer metadata is reused
pytestmark = pytest.mark.skipif(not STORIES_GGUF.is_file(), reason="shared/models/stories260K is absent")

U32, F32, BOOL = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.BOOL
ARCH = "deepseek2"
# what llama.cpp can say: yarn with mscale = mscale_all_dim (its cos/sin stay unscaled), like DeepSeek-V3's
OVERRIDES = dict(num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
                 qk_nope_head_dim=32, v_head_dim=24, n_routed_experts=8, n_group=4, topk_group=2,
                 num_experts_per_tok=3, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                 routed_scaling_factor=2.5, norm_topk_prob=True, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.7,
                                  "mscale_all_dim": 0.7, "original_max_position_embeddings": 64})


def hf_model(folder):
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**BASE, **OVERRIDES})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn_like(b) * 0.2)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_TOKENIZER / f, folder / f)
    return model


def split_kv_b(w: np.ndarray, c) -> tuple[np.ndarray, np.ndarray]:
    """convert_hf_to_gguf.py's DeepseekV2Model: kv_b [H * (Dn + Dv), C] -> k_b [H, C, Dn], v_b [H, Dv, C]."""
    kv = w.reshape(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
    return np.ascontiguousarray(kv[:, :c.qk_nope_head_dim].transpose(0, 2, 1)), np.ascontiguousarray(kv[:, c.qk_nope_head_dim:])


def gguf_tensors(family, folder, c, split: bool, qtypes: dict) -> list:
    """(GGUF name, array, GGML type) by the family's table, names checked against llama.cpp's list for
    deepseek2; qtypes: GGUF name part (e.g. "_exps") -> GGML type."""
    known = {TENSOR_NAMES[t] for t in MODEL_TENSORS[MODEL_ARCH.DEEPSEEK2]}
    weights = open_weights(folder)
    out = []

    def add(name, w):
        q = next((t for part, t in qtypes.items() if part in name), None)
        out.append((name, quantize(w, q), q) if q is not None else (name, w, None))

    for g, h in family.GGUF_TENSORS.items():
        assert g.rsplit(".", 1)[0].replace("{i}", "{bid}") in known, g
        for i in range(c.num_hidden_layers) if "{i}" in g else [None]:
            name = h.format(i=i)
            if name not in weights:                # q_proj (q_lora_rank is set), dense / MoE tensors elsewhere
                continue
            w = np.array(weights[name], np.float32)
            if split and name.endswith("kv_b_proj.weight"):
                for part, a in zip(("attn_k_b", "attn_v_b"), split_kv_b(w, c)):
                    assert f"blk.{{bid}}.{part}" in known
                    add(f"blk.{i}.{part}.weight", a)
                continue
            add(g.format(i=i), w)
    return out


def write_like_convert_hf_to_gguf(model, family, folder, path, split: bool, qtypes=None):
    c = model.config
    r = c.rope_parameters
    heads_kv, key, value = (1, c.kv_lora_rank + c.qk_rope_head_dim, c.kv_lora_rank) if split else \
        (c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim)
    kv = {f"{ARCH}.{k}": v for k, v in {
        "context_length": (c.max_position_embeddings, U32), "embedding_length": (c.hidden_size, U32),
        "block_count": (c.num_hidden_layers, U32), "feed_forward_length": (c.intermediate_size, U32),
        "attention.head_count": (c.num_attention_heads, U32), "attention.head_count_kv": (heads_kv, U32),
        "attention.layer_norm_rms_epsilon": (c.rms_norm_eps, F32), "rope.freq_base": (r["rope_theta"], F32),
        "expert_count": (c.n_routed_experts, U32), "expert_used_count": (c.num_experts_per_tok, U32),
        "leading_dense_block_count": (c.first_k_dense_replace, U32), "attention.q_lora_rank": (c.q_lora_rank, U32),
        "attention.kv_lora_rank": (c.kv_lora_rank, U32), "attention.key_length": (key, U32),
        "attention.value_length": (value, U32), "expert_feed_forward_length": (c.moe_intermediate_size, U32),
        "expert_shared_count": (c.n_shared_experts, U32), "expert_weights_scale": (c.routed_scaling_factor, F32),
        "expert_weights_norm": (c.norm_topk_prob, BOOL), "expert_gating_func": (2, U32),
        "expert_group_count": (c.n_group, U32), "expert_group_used_count": (c.topk_group, U32),
        "rope.dimension_count": (c.qk_rope_head_dim, U32), "rope.scaling.type": ("yarn", GGUFValueType.STRING),
        "rope.scaling.factor": (r["factor"], F32),
        "rope.scaling.original_context_length": (r["original_max_position_embeddings"], U32),
        "rope.scaling.yarn_log_multiplier": (0.1 * r["mscale_all_dim"], F32)}.items()}
    if split:
        kv[f"{ARCH}.attention.key_length_mla"] = (c.qk_nope_head_dim + c.qk_rope_head_dim, U32)
        kv[f"{ARCH}.attention.value_length_mla"] = (c.v_head_dim, U32)
    src = GGUFReader(str(STORIES_GGUF))
    return copy_gguf(STORIES_GGUF, path, arch=ARCH, set_kv=kv,
                     drop_kv=[k for k in src.fields if k.startswith("llama.")],
                     drop_tensors={t.name for t in src.tensors},
                     add_tensors=gguf_tensors(family, folder, c, split, qtypes or {}))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("deepseek")
    return d, hf_model(d / "hf"), find_family(["DeepseekV3ForCausalLM"])


@pytest.fixture(scope="module", params=["split_kv_b", "kv_b"])
def pair(request, hf):
    """(layout, HF folder, GGUF file of the same weights)."""
    d, model, family = hf
    split = request.param == "split_kv_b"
    return request.param, d / "hf", write_like_convert_hf_to_gguf(model, family, d / "hf", d / f"{request.param}.gguf",
                                                                   split)


def test_config_equals_the_hf_folder(pair):
    layout, hf, path = pair
    g = open_gguf(path)
    assert g.family.ARCHITECTURES == ("DeepseekV3ForCausalLM",)
    got = dataclasses.asdict(g.family.Config.from_hf(g.hf_config))
    want = dataclasses.asdict(g.family.Config.from_hf(load_hf_config(hf)))
    assert got.keys() == want.keys()
    for k in got:
        a, b = got[k], want[k]
        if k == "rope":   # float32 roundings of the file's floats
            a, b = dict(a), dict(b)
            assert a.keys() == b.keys() and all(np.float32(a[x]) == np.float32(b[x]) if isinstance(a[x], float)
                                                else a[x] == b[x] for x in a), (a, b)
        else:
            assert (np.float32(a) == np.float32(b)) if isinstance(a, float) else a == b, (k, a, b)
    if layout == "split_kv_b":   # kv_b_proj joined back from attn_k_b / attn_v_b, bit for bit
        name = "model.layers.1.self_attn.kv_b_proj.weight"
        assert g.weights.info(name) == ("float32", (4 * (32 + 24), 32))
        np.testing.assert_array_equal(g.weights[name], open_weights(hf)[name])


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_same_logits_as_the_hf_folder_plan(pair, backend, tmp_path):
    layout, hf, path = pair
    a = Engine.load(compile_model(path, tmp_path / "gguf", backend=backend, progress=False))
    b = Engine.load(compile_model(hf, tmp_path / "hf", backend=backend, progress=False))
    assert a.plan.kv == b.plan.kv and b.plan.kv["latent"] == {"kv_lora_rank": 32, "rope_dim": 16}
    # the page pool: one [pages, 16, 1, 32 + 16] array per layer, no V
    assert {k: v.shape[1:] for k, v in a.pool.arrays.items()} == {f"kv_cache.{i}.latent": (16, 1, 48) for i in range(3)}
    assert PagePool.page_bytes(a.plan.kv) == 3 * 16 * 48 * 4
    for n in (32, 5):
        ids = [1] + np.random.default_rng(n).integers(3, 512, n - 1).tolist()
        np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=0, atol=1e-5)


def test_quantized_experts_stay_quantized(hf, tmp_path):
    """Q8_0 expert stacks and shared experts stay quantized (gate and up still fuse); the cpu kernels
    give the reference backend's logits and greedy tokens, and the plan stays near the float one."""
    from reft.runtime.generate import GenerationRequest, generate
    from reft.runtime.sampler import SamplingParams

    d, model, family = hf
    q8 = GGMLQuantizationType.Q8_0
    path = write_like_convert_hf_to_gguf(model, family, d / "hf", tmp_path / "q.gguf", True, {"_exps": q8, "_shexp": q8})
    engines = {b: Engine.load(compile_model(path, tmp_path / b, backend=b, progress=False)) for b in ("reference", "cpu")}
    graph = (tmp_path / "cpu" / "graphs" / "forward.ir").read_text()
    assert "q8_0[8,64,64] {name='model.layers.2.mlp.experts.*.gate_proj+up_proj.weight'" in graph
    assert "q8_0[64,32] {name='model.layers.2.mlp.shared_experts.down_proj.weight'" in graph
    ids = [1] + np.random.default_rng(7).integers(3, 512, 23).tolist()
    ref, cpu = engines["reference"].logits(ids), engines["cpu"].logits(ids)
    assert np.abs(cpu - ref).max() < 1e-4 * np.abs(ref).max()
    req = lambda: GenerationRequest(ids, 16, SamplingParams(temperature=0.0))  # noqa: E731
    assert list(generate(engines["cpu"], req())) == list(generate(engines["reference"], req()))
    full = Engine.load(compile_model(d / "hf", tmp_path / "float", backend="reference", progress=False)).logits(ids)
    assert np.linalg.norm(ref - full) < 0.02 * np.linalg.norm(full)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_quantized_kv_b_is_dequantized_into_the_absorbed_weights(hf, backend, tmp_path):
    """A Q8_0 attn_kv_b (kept quantized by the compiler where only a linear reads it) is dequantized
    for absorb_latent_attention: the logits are transformers' with kv_b_proj rounded through Q8_0 the
    same way (MLA is sensitive to it: ~10% of the logits' norm on this model, so only an exact
    comparison tells a right dequantization from a wrong one)."""
    from gguf.quants import dequantize
    from hf_tiny import hf_logits

    d, model, family = hf
    q8 = GGMLQuantizationType.Q8_0
    path = write_like_convert_hf_to_gguf(model, family, d / "hf", tmp_path / "kvb.gguf", False, {"attn_kv_b": q8})
    engine = Engine.load(compile_model(path, tmp_path / "plan", backend=backend, progress=False))
    graph = (tmp_path / "plan" / "graphs" / "forward.ir").read_text()
    assert "float32[4,32,32] {name='model.layers.2.self_attn.kv_b_proj.absorbed_k.weight'" in graph
    rounded = transformers.DeepseekV3ForCausalLM(model.config).eval()
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.endswith("kv_b_proj.weight"):
                w = p.numpy().copy()
                p.copy_(torch.from_numpy(dequantize(quantize(w, q8), q8).reshape(w.shape)))
    ids = [1] + np.random.default_rng(8).integers(3, 512, 23).tolist()
    np.testing.assert_allclose(engine.logits(ids), hf_logits(rounded, ids), rtol=0, atol=1e-4)


def test_softmax_gating_is_a_one_line_error(hf, tmp_path):
    """llama.cpp's deepseek2 also holds DeepSeek-V2 (softmax gating): refused in one line, no plan."""
    from click.testing import CliRunner

    from reft.cli.reftc import main

    d, model, family = hf
    path = write_like_convert_hf_to_gguf(model, family, d / "hf", tmp_path / "v3.gguf", True)
    bad = copy_gguf(path, tmp_path / "v2.gguf", set_kv={f"{ARCH}.expert_gating_func": (1, U32)})
    r = CliRunner().invoke(main, ["compile", str(bad), "-o", str(tmp_path / "plan")])
    assert r.exit_code == 1 and r.output.strip().splitlines() == [
        f"error: {bad}: deepseek2 expert_gating_func 1 is not supported (DeepSeek-V3's sigmoid only)"]
    assert not (tmp_path / "plan").exists()
