"""`--quant int8|int4` on a mixture-of-experts model: the experts' stacked weights are quantized too
(each expert's matrix row by row), the router stays float, the cpu backend runs the same weights as
the reference backend, and the reference equals transformers with every quantized weight replaced
by reft.quant's round trip of it."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hf_tiny import hf_logits, make_model

from reft.compiler import compile_model
from reft.plan import read_manifest
from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return make_model("qwen3-moe", tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module", params=[("int8", 32), ("int4", 32)], ids=["int8", "int4_g32"])
def engines(request, hf_model, tmp_path_factory):
    quant, group = request.param
    model_dir, hf = hf_model
    out = {}
    for backend in ("reference", "cpu"):
        plan = compile_model(model_dir, tmp_path_factory.mktemp(backend) / "plan", backend=backend, progress=False,
                             quant=quant, group_size=group)
        out[backend] = Engine.load(plan)
        out[f"{backend}_plan"] = plan
    return request.param, hf, out


def prompt(n=24, seed=5):
    return [1] + np.random.default_rng(seed).integers(3, 512, n - 1).tolist()


def test_experts_quantized_router_float(engines):
    (quant, group), _, e = engines
    dt = "int8" if quant == "int8" else f"int4_g{group}"
    graph = (e["cpu_plan"] / "graphs" / "forward.ir").read_text()
    params = [line for line in graph.splitlines() if "= param()" in line]
    experts = [p for p in params if "experts.*" in p]
    assert experts and all(f"{dt}[" in p for p in experts)
    assert all("float32[" in p for p in params if ".mlp.gate.weight" in p)
    counts = read_manifest(e["cpu_plan"])["passes"]
    q = next(p for p in counts if p["name"] == "quantize_weights")["counts"]
    # after fuse_projections, per layer: attention's qkv and o; gate_up and down of the experts (2 sparse
    # layers) or of the dense MLP (1)
    assert q["kept_router"] == 2 and q[f"to_{dt}"] == 3 * 2 + 2 * 2 + 1 * 2


def test_cpu_matches_reference_and_transformers(engines):
    (quant, group), hf, e = engines
    ids = prompt()
    ref, cpu = e["reference"].logits(ids), e["cpu"].logits(ids)
    assert np.abs(cpu - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    req = lambda: GenerationRequest(ids, 24, SamplingParams(temperature=0.0))  # noqa: E731
    assert list(generate(e["cpu"], req())) == list(generate(e["reference"], req()))
    want = hf_logits(dequantized_copy(hf, quant, group), ids)
    assert np.abs(ref - want).max() < 1e-4 * np.abs(want).max()


def dequantized_copy(hf, quant: str, group: int):
    """The model with every projection and expert matrix (not the router, the LM head or the
    embedding) replaced by its quantize-dequantize round trip."""
    from reft.quant import quantize_int4, quantize_int8

    def round_trip(w: np.ndarray) -> np.ndarray:
        q = quantize_int8(w) if quant == "int8" else quantize_int4(w, group)
        return np.ascontiguousarray(q.dequantize(), np.float32)

    m = copy.deepcopy(hf)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(torch.from_numpy(round_trip(mod.weight.numpy())))
            if name.endswith("mlp.experts"):
                for p in (mod.gate_up_proj, mod.down_proj):              # (E, out, in)
                    p.copy_(torch.from_numpy(np.stack([round_trip(w) for w in p.numpy()])))
    return m
