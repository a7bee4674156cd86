"""The op features GPT-OSS brought against transformers' own modules: the router's softmax over the
chosen logits (moe_router topk_softmax), the clamped SwiGLU (swiglu_oai, and expert_glu with it and
bias rows), a whole sparse block rebuilt from the checkpoint's x @ W expert tensors with the view ops
the model writes, attention sinks in the softmax denominator (with sliding windows), and YaRN rope
(frequencies and the cos/sin scale, truncated or not)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.ir import ops
from reft.ir.types import TensorType
from reft_models.llama import rope_attrs
from strategies import rand, token_batch

VALUES = settings(max_examples=20, deadline=None)
transformers = pytest.importorskip("transformers")
gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")


def ref(op, *xs, **attrs):
    d = ops.get(op)
    out = d.ref(list(xs), d.full_attrs(attrs))
    return out[0] if len(out) == 1 else out


def config(E=6, k=3, D=16, F=8, **kw):
    return transformers.GptOssConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=k,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, **kw)


def randomized(module, seed: int, std: float = 0.4):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module.eval()


def np_(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


@VALUES
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 9), E=st.integers(2, 9), data=st.data())
def test_router_vs_transformers(seed, T, E, data):
    """Same experts in the same order (largest logit first) and the same weights; the bias counts."""
    k = data.draw(st.integers(1, E))
    router = randomized(gpt_oss.GptOssTopKRouter(config(E=E, k=k)), seed)
    x = np.random.default_rng(seed).standard_normal((T, 16)).astype(np.float32)
    with torch.no_grad():
        _, want_w, want_ids = router(torch.from_numpy(x))
    logits = ref("linear", x, np_(router.weight), np_(router.bias))
    ids, w = ref("moe_router", logits, top_k=k, mode="topk_softmax")
    np.testing.assert_array_equal(ids, want_ids.numpy())
    np.testing.assert_allclose(w, want_w.numpy(), rtol=1e-6, atol=1e-7)


def test_topk_softmax_ties_go_to_the_lower_id():
    ids, w = ref("moe_router", np.array([[1.0, 3.0, 3.0, 3.0]], np.float32), top_k=2, mode="topk_softmax")
    assert ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(w, [[0.5, 0.5]])


@VALUES
@given(seed=st.integers(0, 2**31 - 1), alpha=st.sampled_from([1.702, 0.7]), limit=st.sampled_from([7.0, 1.0, 0.3]))
def test_swiglu_oai_vs_transformers(seed, alpha, limit):
    """GptOssExperts._apply_gate on interleaved (gate, up) columns, clamping included."""
    experts = gpt_oss.GptOssExperts(config(swiglu_alpha=alpha, swiglu_limit=limit))
    gate_up = rand(np.random.default_rng(seed), (5, 3, 16), "float32", -4, 4)
    want = np_(experts._apply_gate(torch.from_numpy(gate_up)))
    got = ref("swiglu_oai", np.ascontiguousarray(gate_up[..., ::2]), np.ascontiguousarray(gate_up[..., 1::2]),
              alpha=alpha, limit=limit)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def checkpoint_views(gate_up, gate_up_bias, down, E, D, F):
    """reft's [E, N, K] stacks from GptOssExperts' tensors through the view ops models/gpt_oss.py writes
    (what fold_weight_views folds at compile time)."""
    gu = ref("reshape", ref("transpose", ref("reshape", gate_up, shape=(E, D, F, 2)), perm=(0, 3, 2, 1)),
             shape=(E, 2 * F, D))
    gub = ref("reshape", ref("transpose", ref("reshape", gate_up_bias, shape=(E, F, 2)), perm=(0, 2, 1)),
              shape=(E, 2 * F))
    return gu, gub, ref("transpose", down, perm=(0, 2, 1))


@VALUES
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 12), fused=st.booleans(), limit=st.sampled_from([7.0, 0.8]))
def test_sparse_block_vs_transformers(seed, T, fused, limit):
    """GptOssMLP = biased router -> topk_softmax -> dispatch -> gate/up with bias rows (expert_linear
    then split, or the fused expert_glu) -> swiglu_oai -> expert_linear_sum with the down bias."""
    E, k, D, F = 6, 3, 16, 8
    block = randomized(gpt_oss.GptOssMLP(config(E=E, k=k, D=D, F=F, swiglu_limit=limit, swiglu_alpha=1.3)), seed)
    x = np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)
    with torch.no_grad():
        want = np_(block(torch.from_numpy(x)[None])[0][0])
    ex = block.experts
    gu, gub, down = checkpoint_views(np_(ex.gate_up_proj), np_(ex.gate_up_proj_bias), np_(ex.down_proj), E, D, F)
    logits = ref("linear", x, np_(block.router.weight), np_(block.router.bias))
    ids, w = ref("moe_router", logits, top_k=k, mode="topk_softmax")
    order, offsets = ref("moe_dispatch", ids, experts=E)
    act = dict(alpha=1.3, limit=limit)
    if fused:
        h = ref("expert_glu", x, order, offsets, gu, gub, act="swiglu_oai", **act)
    else:
        g, u = ref("split", ref("expert_linear", x, order, offsets, gu, gub), axis=-1, sizes=(F, F))
        h = ref("swiglu_oai", g, u, **act)
    got = ref("expert_linear_sum", h, order, offsets, w, down, np_(ex.down_proj_bias))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@VALUES
@given(seed=st.integers(0, 2**32 - 1), batch=token_batch(max_seqs=1, max_past=0, max_new=9),
       window=st.sampled_from([0, 3]), sink_scale=st.sampled_from([0.1, 3.0, 20.0]))
def test_attention_sinks_vs_gpt_oss_eager(seed, batch, window, sink_scale):
    """GPT-OSS's eager attention: the sink logit joins each head's softmax, then is dropped."""
    _, sid, pos = batch
    order = np.argsort(pos)
    sid, pos = sid[order], pos[order]
    T, H, Hkv, D, scale = len(pos), 4, 2, 8, 0.35
    rng = np.random.default_rng(seed)
    q, k, v = rand(rng, (T, H, D), "float32"), rand(rng, (T, Hkv, D), "float32"), rand(rng, (T, Hkv, D), "float32")
    sinks = rand(rng, (H,), "float32", -1, 1) * np.float32(sink_scale)
    got = ref("causal_attention", q, k, v, pos, sid, sinks, scale=scale, sliding_window=window)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    mask = torch.from_numpy(np.where(allowed, 0.0, -np.inf).astype(np.float32))[None, None]
    t = lambda a: torch.from_numpy(a).permute(1, 0, 2)[None]         # noqa: E731  (1, H, T, D)
    module = SimpleNamespace(num_key_value_groups=H // Hkv, training=False, sinks=torch.from_numpy(sinks))
    want, _ = gpt_oss.eager_attention_forward(module, t(q), t(k), t(v), mask, scaling=scale)
    np.testing.assert_allclose(got, want[0].numpy(), rtol=1e-5, atol=1e-5)
    plain = ref("causal_attention", q, k, v, pos, sid, scale=scale, sliding_window=window)
    assert np.abs(np.linalg.norm(got, axis=-1)).sum() < np.abs(np.linalg.norm(plain, axis=-1)).sum()   # sinks drain


@pytest.mark.parametrize("truncate", [True, False])
@pytest.mark.parametrize("dim,orig,factor,theta", [(16, 512, 8.0, 10000.0), (64, 4096, 32.0, 150000.0),
                                                   (32, 64, 4.0, 500.0)])
def test_yarn_vs_transformers(dim, orig, factor, theta, truncate):
    """The rope op with models/llama.rope_attrs' YaRN attributes rotates q as GptOssRotaryEmbedding +
    apply_rotary_pos_emb do: the blended frequencies and the 0.1 ln(factor) + 1 cos/sin scale."""
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor, "beta_fast": 32.0, "beta_slow": 1.0,
              "truncate": truncate, "original_max_position_embeddings": orig}
    cfg = transformers.GptOssConfig(hidden_size=64, head_dim=dim, num_attention_heads=4,
                                    max_position_embeddings=int(orig * factor), rope_parameters=params)
    rot = gpt_oss.GptOssRotaryEmbedding(cfg)
    pos = np.array([0, 1, 7, 30, 63], np.int32)     # float32 angles: 1 ulp of frequency grows with position
    x = rand(np.random.default_rng(dim), (len(pos), 4, dim), "float32")
    with torch.no_grad():
        cos, sin = rot(torch.from_numpy(x), torch.from_numpy(pos.astype(np.int64))[None])
        t = torch.from_numpy(x).permute(1, 0, 2)[None]
        want = gpt_oss.apply_rotary_pos_emb(t, t, cos, sin)[0][0].permute(1, 0, 2).numpy()
    hf = {"rope_theta": theta, "rope_scaling": {k: v for k, v in params.items() if k != "rope_theta"},
          "max_position_embeddings": int(orig * factor)}
    a = dict(rope_attrs(hf, dim))
    assert a["attention_factor"] == pytest.approx(rot.attention_scaling)
    np.testing.assert_allclose(ops.nn.rope_inv_freq(ops.get("rope").full_attrs(a)), np_(rot.inv_freq), rtol=1e-6)
    np.testing.assert_allclose(ref("rope", x, pos, **a), want, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("op,types,attrs", [
    ("moe_router", [TensorType(("T", 4), "float32")], {"top_k": 5, "mode": "topk_softmax"}),
    ("expert_linear", [TensorType(("T", 8), "float32"), TensorType(("T", 2), "int32"), TensorType((5,), "int32"),
                       TensorType((4, 6, 8), "float32"), TensorType((4, 8), "float32")], {}),    # bias not [E, N]
    ("expert_glu", [TensorType(("T", 8), "float32"), TensorType(("T", 2), "int32"), TensorType((5,), "int32"),
                    TensorType((4, 6, 8), "float32"), TensorType((6,), "float32")], {"act": "swiglu_oai"}),
    ("expert_glu", [TensorType(("T", 8), "float32"), TensorType(("T", 2), "int32"), TensorType((5,), "int32"),
                    TensorType((4, 6, 8), "float32")], {"act": "swiglu"}),
    ("swiglu_oai", [TensorType(("T", 8), "float32"), TensorType(("T", 4), "float32")], {}),
    ("swiglu_oai", [TensorType(("T", 8), "float32"), TensorType(("T", 8), "float32")], {"limit": 0.0}),
    ("paged_attention", [TensorType(("T", 4, 8), "float32"), TensorType(("NP", 16, 2, 8), "float32"),
                         TensorType(("NP", 16, 2, 8), "float32"), TensorType(("T",), "int32"),
                         TensorType(("T",), "int32"), TensorType(("S", "MP"), "int32"), TensorType((4, 1), "float32")],
     {"scale": 1.0}),                                                                              # sinks not [H]
])
def test_misuse_is_a_type_error(op, types, attrs):
    with pytest.raises(TypeError):
        ops.infer_types(op, types, attrs)


def test_sinks_have_no_gradient_rule_yet():
    from reft.errors import ReftError
    from reft.ir import GraphBuilder

    b = GraphBuilder("f")
    q = b.input("q", ("T", 2, 4), "float32")
    pos, sid = b.input("pos", ("T",), "int32"), b.input("sid", ("T",), "int32")
    node = b.causal_attention(q, q, q, pos, sid, b.input("sinks", (2,), "float32"), scale=1.0).node
    with pytest.raises(ReftError, match="sinks"):
        ops.get("causal_attention").vjp(b, node, [q], [True] * 6)
