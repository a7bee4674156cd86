"""The mixture-of-experts op references against transformers' own modules: the routers of Mixtral and
Qwen3-MoE (with and without norm_topk_prob) and whole sparse blocks (router, experts, weighted sum)
rebuilt from moe_router, moe_dispatch, expert_linear / expert_glu and expert_linear_sum; and what
moe_dispatch's order and offsets mean."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.ir import ops
from reft.ir.types import TensorType

VALUES = settings(max_examples=20, deadline=None)
transformers = pytest.importorskip("transformers")


def ref(op, *xs, **attrs):
    d = ops.get(op)
    out = d.ref(list(xs), d.full_attrs(attrs))
    return out[0] if len(out) == 1 else out


def moe_config(family: str, E: int, k: int, D: int, F: int, norm: bool):
    if family == "mixtral":
        return transformers.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k)
    return transformers.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=k,
                                       norm_topk_prob=norm)


def sparse_block(family: str, cfg, seed: int):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    torch.manual_seed(seed)
    block = (MixtralSparseMoeBlock if family == "mixtral" else Qwen3MoeSparseMoeBlock)(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


FAMILIES = st.sampled_from([("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False)])


@VALUES
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 9), E=st.integers(2, 8), family=FAMILIES, data=st.data())
def test_router_vs_transformers(seed, T, E, family, data):
    """The same experts, in the same order (most probable first), and the same weights."""
    name, norm = family
    k = data.draw(st.integers(1, E))
    block = sparse_block(name, moe_config(name, E, k, 16, 8, norm), seed)
    x = np.random.default_rng(seed).standard_normal((T, 16)).astype(np.float32)
    with torch.no_grad():
        _, want_w, want_ids = block.gate(torch.from_numpy(x))
    logits = ref("linear", x, block.gate.weight.detach().numpy())
    ids, w = ref("moe_router", logits, top_k=k, mode="softmax_topk", normalize=norm)
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_allclose(w, want_w.numpy(), rtol=1e-6, atol=1e-7)


@VALUES
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), family=FAMILIES, fused=st.booleans())
def test_sparse_block_vs_transformers(seed, T, family, fused):
    """transformers' sparse MLP = router -> dispatch -> gate/up (separate expert_linears, or the
    fused expert_glu on [gate; up]) -> SiLU product -> expert_linear_sum."""
    name, norm = family
    E, k, D, F = 6, 2, 16, 12
    block = sparse_block(name, moe_config(name, E, k, D, F, norm), seed)
    x = np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)[None])[0].numpy()
    gate_up = block.experts.gate_up_proj.detach().numpy()                  # (E, 2F, D): gate rows, then up
    down = block.experts.down_proj.detach().numpy()                        # (E, D, F)
    ids, w = ref("moe_router", ref("linear", x, block.gate.weight.detach().numpy()), top_k=k, normalize=norm)
    order, offsets = ref("moe_dispatch", ids, experts=E)
    if fused:
        h = ref("expert_glu", x, order, offsets, gate_up, act="silu")
    else:
        g = ref("expert_linear", x, order, offsets, np.ascontiguousarray(gate_up[:, :F]))
        u = ref("expert_linear", x, order, offsets, np.ascontiguousarray(gate_up[:, F:]))
        h = ref("mul", ref("silu", g), u)
    got = ref("expert_linear_sum", h, order, offsets, w, down)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@VALUES
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(0, 9), E=st.integers(1, 7), k=st.integers(1, 3))
def test_dispatch_groups_slots_by_expert(seed, T, E, k):
    ids = np.random.default_rng(seed).integers(0, E, (T, k)).astype(np.int32)
    order, offsets = ref("moe_dispatch", ids, experts=E)
    flat = order.reshape(-1)
    assert sorted(flat.tolist()) == list(range(T * k))                      # a permutation of the slots
    assert offsets[0] == 0 and offsets[-1] == T * k and (np.diff(offsets) >= 0).all()
    for e in range(E):
        slots = flat[offsets[e]:offsets[e + 1]]
        assert (ids.reshape(-1)[slots] == e).all() and (np.diff(slots) > 0).all()   # expert e's, in slot order


def test_router_ties_go_to_the_lower_id():
    ids, w = ref("moe_router", np.array([[1.0, 3.0, 3.0, 3.0]], np.float32), top_k=2)
    assert ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(w, [[0.5, 0.5]])


@pytest.mark.parametrize("op,types,attrs", [
    ("moe_router", [TensorType(("T", 4), "float32")], {"top_k": 5}),
    ("moe_router", [TensorType(("T", 4), "float32")], {"top_k": 2, "mode": "sigmoid"}),
    ("moe_dispatch", [TensorType(("T", 2), "int64")], {"experts": 4}),
    ("expert_linear", [TensorType(("T", 8), "float32"), TensorType(("T", 2), "int32"), TensorType((4,), "int32"),
                       TensorType((4, 6, 8), "float32")], {}),     # offsets must be [E + 1]
    ("expert_linear", [TensorType(("T", 8), "float32"), TensorType(("T", 2), "int32"), TensorType((5,), "int32"),
                       TensorType((4, 6, 7), "float32")], {}),     # K disagrees
    ("expert_glu", [TensorType(("T", 8), "float32"), TensorType(("T", 2), "int32"), TensorType((5,), "int32"),
                    TensorType((4, 7, 8), "float32")], {"act": "silu"}),   # odd gate/up rows
    ("expert_linear_sum", [TensorType(("T", 2, 6), "float32"), TensorType(("T", 2), "int32"),
                           TensorType((5,), "int32"), TensorType(("T", 3), "float32"),
                           TensorType((4, 8, 6), "float32")], {}),  # router weights not [T, k]
])
def test_misuse_is_a_type_error(op, types, attrs):
    with pytest.raises(TypeError):
        ops.infer_types(op, types, attrs)


def test_quantized_stacks():
    """A stack of quantized matrices [E, N, K] is stored as uint8[E, N, row_bytes]."""
    t = TensorType((4, 10, 64), "q8_0")
    assert t.storage_shape() == (4, 10, 68) and t.nbytes() == 4 * 10 * 68
    with pytest.raises(TypeError, match="stack"):
        TensorType((2, 4, 10, 64), "q8_0")
