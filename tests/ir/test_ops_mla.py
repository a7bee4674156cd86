"""DeepSeek-V3's ops against transformers' own modules: the grouped sigmoid router (moe_router mode
sigmoid_group_topk) against DeepseekV3TopkRouter, the sparse block with shared experts against
DeepseekV3MoE, and multi-head latent attention as models/deepseek_v3.py writes it (naive) and after
absorb_latent_attention (latent_attention + head_linear) against DeepseekV3Attention; plus what the
absorbed form means on its own (the expanded attention it equals) and misuse of the new ops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reft.frontends.config import normalize_rope
from reft.ir import GraphBuilder, ops
from reft.ir.interpret import ReferenceExecutor
from reft.ir.types import TensorType
from reft.passes.absorb_latent_attention import absorb_latent_attention
from reft.passes.context import PassContext, WeightStore
from reft.passes.eliminate_dead_code import eliminate_dead_code

transformers = pytest.importorskip("transformers")
ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
VALUES = settings(max_examples=15, deadline=None)


def ref(op, *xs, **attrs):
    d = ops.get(op)
    out = d.ref(list(xs), d.full_attrs(attrs))
    return out[0] if len(out) == 1 else out


def hf_config(**over):
    base = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_attention_heads=4,
                num_key_value_heads=4, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
                n_shared_experts=1, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12,
                v_head_dim=10, routed_scaling_factor=2.5, norm_topk_prob=True, max_position_embeddings=128)
    cfg = transformers.DeepseekV3Config(**{**base, **over})
    cfg._attn_implementation = "eager"
    return cfg


def randomize(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    return module.eval()


@VALUES
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 9), groups=st.sampled_from([(8, 4, 2), (8, 1, 1), (12, 3, 2),
                                                                                    (6, 2, 1)]),
       k=st.integers(1, 4), norm=st.booleans(), scale=st.sampled_from([1.0, 2.5]))
def test_grouped_router_vs_transformers(seed, T, groups, k, norm, scale):
    """The same experts (transformers' top-k is unsorted: compared as sets) with the same weights."""
    E, G, TG = groups
    k = min(k, TG * (E // G))
    cfg = hf_config(n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=k, norm_topk_prob=norm,
                    routed_scaling_factor=scale)
    gate = randomize(ds.DeepseekV3TopkRouter(cfg), seed)
    x = np.random.default_rng(seed).standard_normal((T, 32)).astype(np.float32)
    with torch.no_grad():
        _, want_w, want_ids = gate(torch.from_numpy(x))
    logits = ref("linear", x, gate.weight.detach().numpy())
    ids, w = ref("moe_router", logits, gate.e_score_correction_bias.numpy(), top_k=k, mode="sigmoid_group_topk",
                 normalize=norm, groups=G, topk_groups=TG, scale=scale)
    want_ids, want_w = want_ids.numpy(), want_w.numpy()
    mine, theirs = np.argsort(ids, axis=-1), np.argsort(want_ids, axis=-1)
    np.testing.assert_array_equal(np.take_along_axis(ids, mine, -1), np.take_along_axis(want_ids, theirs, -1))
    np.testing.assert_allclose(np.take_along_axis(w, mine, -1), np.take_along_axis(want_w, theirs, -1),
                               rtol=1e-6, atol=1e-7)


def test_grouped_router_keeps_the_best_groups_only():
    """Group 1 holds the best single expert, but group 0's two best sum higher: with one group kept,
    the choice comes from group 0; the bias chooses, the unbiased scores weigh."""
    logits = np.array([[1.0, 1.0, 3.0, -3.0]], np.float32)
    bias = np.array([0.0, 0.1, 0.0, 0.0], np.float32)
    ids, w = ref("moe_router", logits, bias, top_k=1, mode="sigmoid_group_topk", normalize=False, groups=2,
                 topk_groups=1)
    assert ids.tolist() == [[1]]
    np.testing.assert_allclose(w, [[1 / (1 + np.exp(-1.0))]], rtol=1e-6)


@VALUES
@given(seed=st.integers(0, 2**31 - 1), T=st.integers(1, 9))
def test_sparse_block_with_shared_experts_vs_transformers(seed, T):
    cfg = hf_config()
    block = randomize(ds.DeepseekV3MoE(cfg), seed)
    x = np.random.default_rng(seed).standard_normal((T, 32)).astype(np.float32)
    with torch.no_grad():
        want = block(torch.from_numpy(x)[None])[0].numpy()
    sd = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    ids, w = ref("moe_router", ref("linear", x, sd["gate.weight"]), sd["gate.e_score_correction_bias"], top_k=3,
                 mode="sigmoid_group_topk", groups=4, topk_groups=2, scale=2.5)
    order, offsets = ref("moe_dispatch", ids, experts=8)
    h = ref("expert_glu", x, order, offsets, sd["experts.gate_up_proj"], act="silu")
    y = ref("expert_linear_sum", h, order, offsets, w, sd["experts.down_proj"])
    g, u = (ref("linear", x, sd[f"shared_experts.{n}_proj.weight"]) for n in ("gate", "up"))
    shared = ref("linear", ref("mul", ref("silu", g), u), sd["shared_experts.down_proj.weight"])
    np.testing.assert_allclose(ref("add", y, shared), want, rtol=1e-5, atol=1e-5)


ATTENTION_CASES = {
    "q_lora-interleave": {},
    "q_proj-halves-bias": dict(q_lora_rank=None, rope_interleave=False, attention_bias=True),
    "yarn-mscale": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "mscale": 0.8,
                                         "mscale_all_dim": 0.6, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_latent_attention_vs_transformers(case):
    """models/deepseek_v3.attention (the naive form) and the graph absorb_latent_attention makes of it
    both give DeepseekV3Attention's output, two sequences in one batch."""
    from reft_models import deepseek_v3

    cfg = hf_config(**ATTENTION_CASES[case])
    attn = randomize(ds.DeepseekV3Attention(cfg, layer_idx=0), 3)
    rope = ds.DeepseekV3RotaryEmbedding(cfg)
    lengths, D = (7, 5), 32
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((n, D)).astype(np.float32) for n in lengths]
    want = []
    with torch.no_grad():
        for x in xs:
            n = len(x)
            cos_sin = rope(torch.zeros(1), torch.arange(n)[None])
            mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
            want.append(attn(torch.from_numpy(x)[None], cos_sin, mask)[0][0].numpy())

    c = deepseek_v3.Config.from_hf(normalize_rope({**cfg.to_dict(), "num_hidden_layers": 1, "vocab_size": 8}, "cfg"))
    b = GraphBuilder("forward")
    x = b.input("x", ("T", D), "float32")
    pos, sid = b.input("positions", ("T",), "int32"), b.input("seq_ids", ("T",), "int32")
    b.output("y", deepseek_v3.attention(b, c, x, pos, sid, ""))
    weights = {k: v.detach().numpy() for k, v in attn.state_dict().items()}
    feeds = {"x": np.concatenate(xs), "positions": np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
             "seq_ids": np.repeat(np.arange(len(lengths)), lengths).astype(np.int32)}
    naive = ReferenceExecutor(b.graph, weights).run(dict(feeds))["y"]
    np.testing.assert_allclose(naive, np.concatenate(want), rtol=1e-5, atol=1e-5)

    ctx = PassContext(WeightStore(weights))
    ctx.current = "absorb_latent_attention"
    g = eliminate_dead_code(absorb_latent_attention(b.graph, ctx), ctx)
    assert ctx.counters["absorb_latent_attention"]["absorbed_layers"] == 1
    assert {n.op for n in g.nodes} >= {"head_linear", "latent_attention"} and "causal_attention" not in {n.op for n in g.nodes}
    absorbed = ReferenceExecutor(g, {n.name: ctx.weights[n.name] for n in g.params()}).run(dict(feeds))["y"]
    np.testing.assert_allclose(absorbed, np.concatenate(want), rtol=1e-5, atol=1e-5)


def test_absorbed_form_equals_the_expanded_attention():
    """latent_attention on W_UK^T q_nope, then W_UV: causal attention over keys [W_UK c; k_r] and
    values W_UV c, per head."""
    rng = np.random.default_rng(5)
    T, H, Dn, R, Dv, C = 6, 3, 4, 2, 5, 7
    q_nope, q_rot = rng.standard_normal((T, H, Dn)), rng.standard_normal((T, H, R))
    c, k_rot = rng.standard_normal((T, C)), rng.standard_normal((T, R))
    w_uk, w_uv = rng.standard_normal((H, Dn, C)), rng.standard_normal((H, Dv, C))
    pos, sid = np.array([0, 1, 2, 0, 3, 1], np.int32), np.array([0, 0, 0, 1, 0, 1], np.int32)
    f = lambda a: a.astype(np.float32)  # noqa: E731
    k = np.concatenate([np.einsum("hdc,tc->thd", w_uk, c), np.repeat(k_rot[:, None], H, axis=1)], axis=-1)
    v = np.einsum("hdc,tc->thd", w_uv, c)
    want = ref("causal_attention", f(np.concatenate([q_nope, q_rot], -1)), f(k), f(v), pos, sid, scale=0.4)
    q_lat = ref("head_linear", f(q_nope), f(w_uk.transpose(0, 2, 1)))
    o = ref("latent_attention", q_lat, f(q_rot), f(c), f(k_rot), pos, sid, scale=0.4)
    np.testing.assert_allclose(ref("head_linear", o, f(w_uv)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op,types,attrs", [
    ("moe_router", [TensorType(("T", 8), "float32")], {"top_k": 2, "mode": "sigmoid_group_topk"}),   # no bias
    ("moe_router", [TensorType(("T", 8), "float32"), TensorType((8,), "float32")], {"top_k": 2}),      # bias, softmax
    ("moe_router", [TensorType(("T", 8), "float32"), TensorType((8,), "float32")],
     {"top_k": 2, "mode": "sigmoid_group_topk", "groups": 3, "topk_groups": 1}),                       # 8 % 3
    ("moe_router", [TensorType(("T", 8), "float32"), TensorType((8,), "float32")],
     {"top_k": 3, "mode": "sigmoid_group_topk", "groups": 4, "topk_groups": 1}),                       # 3 > 1 * 2
    ("head_linear", [TensorType(("T", 2, 8), "float32"), TensorType((3, 4, 8), "float32")], {}),      # H
    ("head_linear", [TensorType(("T", 2, 32), "float32"), TensorType((2, 4, 32), "q8_0")], {}),       # float only
    ("latent_attention", [TensorType(("T", 2, 8), "float32"), TensorType(("T", 2, 2), "float32"),
                          TensorType(("T", 7), "float32"), TensorType(("T", 2), "float32"),
                          TensorType(("T",), "int32"), TensorType(("T",), "int32")], {"scale": 1.0}),  # C
    ("paged_latent_attention", [TensorType(("T", 2, 8), "float32"), TensorType(("T", 2, 2), "float32"),
                                TensorType(("NP", 4, 2, 10), "float32"), TensorType(("T",), "int32"),
                                TensorType(("T",), "int32"), TensorType(("S", "MP"), "int32")], {"scale": 1.0}),
    ("latent_cache_write", [TensorType(("NP", 4, 1, 9), "float32"), TensorType(("T", 8), "float32"),
                            TensorType(("T", 2), "float32"), TensorType(("T",), "int32"), TensorType(("T",), "int32"),
                            TensorType(("S", "MP"), "int32")], {}),                                    # 8 + 2 != 9
])
def test_misuse_is_a_type_error(op, types, attrs):
    with pytest.raises(TypeError):
        ops.infer_types(op, types, attrs)
