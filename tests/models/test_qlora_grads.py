"""QLoRA: LoRA on a GGUF model whose projections stay in llama.cpp's blocks (tests/qlora_tiny.py: all
eight block types, a Q8_0 embedding, a Q6_K head). The train plan keeps every frozen projection and
the embedding in their blocks and the LM head (which the loss reads) in float32; its loss and the
gradient of every lora_A / lora_B match torch autograd through PEFT on the transformers model
holding the weights the `gguf` package dequantizes, within 1e-4 relative, on the reference and cpu
backends (the quantized forward's int16-rounded activations, reft/ir/quantized.py, stay well inside
that). The cpu kernel of the input gradient on a quantized weight (grad.h k_linear_grad_input_q)
matches the reference for every block type at chunk and thread-split edges.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from qlora_tiny import STORIES_GGUF, block_rows, hf_model, write_tiny_gguf
from test_lora_peft_grads import TARGETS, adapters, peft_loss_and_grads, peft_model, reft_executable
from test_train_grads import batch, pretrain_batch, sft_batch

from reft import backends
from reft.frontends.source import open_source
from reft.ir import GraphBuilder, verify
from reft.ir.interpret import ReferenceExecutor
from reft.ir.quantized import GGML_NAMES
from reft.ir.types import QUANT_DTYPES
from reft.runtime.plan import Plan

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(not STORIES_GGUF.is_file(), reason="shared/models/stories260K is absent")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(ModelSource of the quantized GGUF, transformers model of its dequantized weights)."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("qlora") / "tiny.gguf")
    return open_source(str(path)), hf_model(path)


def rel_err(got, want) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_qlora_gradients_match_peft_on_the_dequantized_model(tiny, backend, tmp_path):
    source, hf = tiny
    if not backends.get(backend).available():
        pytest.skip(f"the {backend} backend is not available")
    targets = TARGETS["all"]
    tensors = adapters(hf, targets)
    exe = reft_executable(source, targets, tensors, backend, tmp_path / "plan")
    types = {n.name: n.out.dtype for n in Plan(tmp_path / "plan").graph("train_grad").params()}
    for name in source.weights:                # the base stays in its blocks; the loss reads a float32 head
        want = "float32" if name == "lm_head.weight" else source.weights.quantized_dtype(name) or "float32"
        assert types[name] == want, (name, types[name])
    ref = peft_model(hf, targets, tensors)
    for kind, make in (("pretrain", pretrain_batch), ("sft", sft_batch)):
        seqs, labels = make(np.random.default_rng(7))
        got = exe.run(batch(seqs, labels), entry="train_grad")
        want_loss, want = peft_loss_and_grads(ref, seqs, labels)
        assert abs(float(got["loss"]) - want_loss) <= 1e-4 * abs(want_loss), (kind, float(got["loss"]), want_loss)
        grads = {k[len("grad."):]: v for k, v in got.items() if k.startswith("grad.")}
        assert set(grads) == set(want)
        for k, g in grads.items():
            assert np.abs(want[k]).max() > 0, (kind, k)
            assert rel_err(g, want[k]) < 1e-4, (backend, kind, k, rel_err(g, want[k]))


def test_input_gradient_kernel_on_every_block_type(tmp_path):
    """dx = dy . W for W in each GGML type: N above GEMM_CHUNK (chunks accumulate), K of several
    decode units split between 2 threads (one unit for K-quants at K = 256: one thread idles),
    token counts at the GEMV / sgemm edges."""
    from reft.backends.cpu import compile_graph

    if not backends.get("cpu").available():
        pytest.skip("no C++ compiler")
    rng = np.random.default_rng(3)
    b = GraphBuilder("grad")
    weights, shapes = {}, {}
    for dt in sorted(GGML_NAMES):
        unit = QUANT_DTYPES[dt][0]
        for n, k in ((300, 3 * unit), (40, unit)):
            name = f"w_{dt}_{n}"
            w = rng.uniform(-0.1, 0.1, (n, k)).astype(np.float32)
            weights[name] = block_rows(w, GGMLQuantizationType[GGML_NAMES[dt]], rng)
            dy = b.input(f"dy_{name}", ("T", n), "float32")
            b.output(name, b.linear_grad_input(dy, b.param(name, (n, k), dt)))
            shapes[name] = n
    verify(b.graph)
    exe = compile_graph({"grad": b.graph}, weights, tmp_path, max_tokens=80, threads=2)
    for T in (1, 5, 17, 80):
        feeds = {f"dy_{name}": rng.standard_normal((T, n)).astype(np.float32) for name, n in shapes.items()}
        want = ReferenceExecutor(b.graph, weights).run(feeds)
        got = exe.run(feeds, entry="grad")
        for name, w in want.items():
            assert got[name].shape == w.shape and np.abs(w).max() > 0, name
            assert rel_err(got[name], w) < 1e-5, (name, T, rel_err(got[name], w))
