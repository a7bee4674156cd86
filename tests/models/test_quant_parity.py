"""Quantized plans of a tiny random-weight Hugging Face model: the cpu backend runs the same
int8 / int4 weights as the reference backend (same logits within float32 tolerance, identical
greedy tokens), and quantization stays close to the float model."""
from __future__ import annotations

import numpy as np
import pytest
from hf_tiny import hf_logits, make_model

from reft.compiler import compile_model
from reft.plan import read_manifest
from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return make_model("llama-gqa-llama3", tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module", params=[("int8", 32), ("int4", 32)], ids=["int8", "int4_g32"])
def engines(request, hf_model, tmp_path_factory):
    quant, group = request.param
    model_dir, hf = hf_model
    out = {}
    for backend in ("reference", "cpu"):
        plan = compile_model(model_dir, tmp_path_factory.mktemp(backend) / "plan", backend=backend, progress=False,
                             quant=quant, group_size=group)
        out[backend] = Engine.load(plan)
        out[f"{backend}_manifest"] = read_manifest(plan)
    return request.param, hf, out


def ids(n=24, seed=5):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, 512, n - 1).tolist()


def test_cpu_matches_reference_on_quantized_plan(engines):
    (quant, group), hf, e = engines
    prompt = ids()
    ref, cpu = e["reference"].logits(prompt), e["cpu"].logits(prompt)
    assert np.abs(cpu - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    req = lambda: GenerationRequest(prompt, 24, SamplingParams(temperature=0.0))  # noqa: E731
    assert list(generate(e["cpu"], req())) == list(generate(e["reference"], req()))
    # independent oracle: transformers with every projection weight replaced by reft.quant's
    # round trip of it (the LM head and the embedding stay float)
    want = hf_logits(dequantized_copy(hf, quant, group), prompt)
    assert np.abs(ref - want).max() < 1e-4 * np.abs(want).max()
    if quant == "int8":   # and int8 stays near the float model itself
        want = hf_logits(hf, prompt)
        assert np.linalg.norm(ref - want) < 0.1 * np.linalg.norm(want)


def dequantized_copy(hf, quant, group):
    import copy

    import torch

    from reft.quant import quantize_int4, quantize_int8

    m = copy.deepcopy(hf)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            w = mod.weight.detach().float().numpy()
            q = quantize_int8(w) if quant == "int8" else quantize_int4(w, group)
            mod.weight.data = torch.from_numpy(np.ascontiguousarray(q.dequantize(), np.float32))
    return m


def test_manifest_records_quantization(engines):
    (quant, group), _, e = engines
    q = e["cpu_manifest"]["quantization"]
    dt = "int8" if quant == "int8" else f"int4_g{group}"
    assert q["method"] == quant and q["lm_head"] != dt and q["embedding"] == "float32"
    assert q["matrices"][dt] > 0


@pytest.mark.parametrize("kv_dtype", ["float16", "bfloat16"])
def test_kv_cache_dtype(kv_dtype, hf_model, tmp_path):
    """--kv-dtype: the plan's KV layout has the dtype, both backends store and read it the same way,
    and the logits stay near the float32-cache model's."""
    model_dir, hf = hf_model
    engines = {}
    for backend in ("reference", "cpu"):
        plan = compile_model(model_dir, tmp_path / backend, backend=backend, progress=False, kv_dtype=kv_dtype)
        assert read_manifest(plan)["kv_cache"]["dtype"] == kv_dtype
        engines[backend] = Engine.load(plan)
    prompt = ids(20, seed=9)
    ref, cpu = engines["reference"].logits(prompt), engines["cpu"].logits(prompt)
    assert np.abs(cpu - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    want = hf_logits(hf, prompt)
    assert np.abs(ref - want).max() < 0.05 * np.abs(want).max()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q5_0"])
def test_gguf_blocks_stay_quantized_and_cpu_matches_reference(qtype, tmp_path):
    """stories260K.gguf re-quantized by the gguf package: the plan keeps the blocks (params of the
    quantized dtype, the file's bytes) and the cpu kernels give the reference backend's tokens."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf_util import copy_gguf
    from paths import SHARED_MODELS

    src = SHARED_MODELS / "stories260K" / "stories260K.gguf"
    if not src.is_file():
        pytest.skip("shared/models/stories260K is absent")
    names = {x.name for x in GGUFReader(str(src)).tensors if len(x.shape) == 2 and x.shape[0] % 32 == 0}
    path = copy_gguf(src, tmp_path / "q.gguf", retype=dict.fromkeys(names, GGMLQuantizationType[qtype]))
    engines = {b: Engine.load(compile_model(path, tmp_path / b, backend=b, progress=False))
               for b in ("reference", "cpu")}
    q = engines["cpu"].plan.manifest["quantization"]
    # 5 layers: q/k/v and gate/up fuse into one matrix each, so 3 quantized per layer, plus the
    # embedding and the head; ffn_down (172 inputs, not whole 32-blocks) stays float
    assert len(names) == 32
    assert q["method"] == "gguf" and q["matrices"] == {qtype.lower(): 17, "float32": 5}
    prompt = ids(12, seed=3)
    # activations are rounded to int16 per block (quantize_activations): a last-bit difference
    # upstream can move a code by one step (1/32767 of the block's max), hence a relative bound
    ref = engines["reference"].logits(prompt)
    assert np.abs(engines["cpu"].logits(prompt) - ref).max() < 1e-3 * max(1.0, np.abs(ref).max())
    req = lambda: GenerationRequest(prompt, 16, SamplingParams(temperature=0.0))  # noqa: E731
    assert list(generate(engines["cpu"], req())) == list(generate(engines["reference"], req()))
