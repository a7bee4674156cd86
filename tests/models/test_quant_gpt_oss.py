"""`--quant int8|int4` on GPT-OSS: the expert stacks (reordered from the checkpoint's x @ W layout by
fold_weight_views) are quantized, their bias rows, the sinks and the biased router stay float32, the
cpu backend runs the same weights as the reference backend, and the reference equals transformers
with every quantized matrix replaced by reft.quant's round trip of it."""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hf_tiny import hf_logits, make_model

from reft.compiler import compile_model
from reft.plan import read_manifest
from reft.runtime.engine import Engine

torch = pytest.importorskip("torch")
CASE = "gpt-oss-sinks-yarn"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return make_model(CASE, tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module", params=[("int8", 32), ("int4", 32)], ids=["int8", "int4_g32"])
def engines(request, hf_model, tmp_path_factory):
    quant, group = request.param
    model_dir, hf = hf_model
    out = {}
    for backend in ("reference", "cpu"):
        plan = compile_model(model_dir, tmp_path_factory.mktemp(backend) / "plan", backend=backend, progress=False,
                             quant=quant, group_size=group)
        out[backend], out[f"{backend}_plan"] = Engine.load(plan), plan
    return request.param, hf, out


def test_experts_quantized_biases_sinks_router_float(engines):
    (quant, group), hf, e = engines
    dt = "int8" if quant == "int8" else f"int4_g{group}"
    graph = (e["cpu_plan"] / "graphs" / "forward.ir").read_text()
    params = [line for line in graph.splitlines() if "= param()" in line]
    stacks = [p for p in params if "mlp.experts." in p and "bias" not in p]
    assert len(stacks) == 2 * hf.config.num_hidden_layers and all(f"{dt}[" in p for p in stacks)
    floats = [p for p in params if "_bias" in p or "sinks" in p or "router" in p]
    assert len(floats) == 5 * hf.config.num_hidden_layers and all("float32[" in p for p in floats)
    q = next(p for p in read_manifest(e["cpu_plan"])["passes"] if p["name"] == "quantize_weights")["counts"]
    # per layer: attention's qkv and o, the experts' gate/up and down stacks; the router kept
    assert q["kept_router"] == hf.config.num_hidden_layers and q[f"to_{dt}"] == 4 * hf.config.num_hidden_layers


def test_cpu_matches_reference_and_transformers(engines):
    (quant, group), hf, e = engines
    ids = [1] + np.random.default_rng(5).integers(3, 512, 23).tolist()
    ref, cpu = e["reference"].logits(ids), e["cpu"].logits(ids)
    assert np.abs(cpu - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())
    want = hf_logits(dequantized_copy(hf, quant, group), ids)
    assert np.abs(ref - want).max() < 1e-4 * np.abs(want).max()


def dequantized_copy(hf, quant: str, group: int):
    """The model with every projection (not the router or the LM head) and expert matrix replaced by
    its quantize-dequantize round trip, rows being the outputs as reft stores them."""
    from reft.quant import quantize_int4, quantize_int8

    def round_trip(w: np.ndarray) -> np.ndarray:     # (out, in)
        q = quantize_int8(w) if quant == "int8" else quantize_int4(w, group)
        return np.ascontiguousarray(q.dequantize(), np.float32)

    m = copy.deepcopy(hf)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":   # the router is no nn.Linear
                mod.weight.copy_(torch.from_numpy(round_trip(mod.weight.numpy())))
            if name.endswith("mlp.experts"):
                for p in (mod.gate_up_proj, mod.down_proj):              # (E, in, out): x @ W
                    p.copy_(torch.from_numpy(np.stack([round_trip(w.T).T for w in p.numpy()])))
    return m
