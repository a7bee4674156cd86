"""Before/Expected programs for the patterns the passes learned with Gemma 2/3 and Phi-3: longrope's
extent input and the norms' (1 + w) offset carried into qkv_rope and add_rms_norm, final-logit
soft-capping taken into the training loss, and AWQ scaling folded through a (1 + w) norm."""
from __future__ import annotations

import numpy as np
from test_golden import check

from reft.ir import parse_graph, print_graph
from reft.ir.interpret import ReferenceExecutor
from reft.passes.attach_loss import attach_loss
from reft.passes.context import PassContext, WeightStore
from reft.passes.fuse_add_rms_norm import fuse_add_rms_norm
from reft.passes.fuse_qkv_rope import fuse_qkv_rope
from reft.passes.scale_activations import scale_activations

LONGROPE = ("attention_factor=1.5, long_factor=(1.0, 4.0), original_max_position=6, rotary_dim=4, scaling='longrope',"
            " short_factor=(1.0, 2.0), theta=10000.0")


def test_fuse_qkv_rope_carries_the_longrope_extent():
    """Phi-3: the checkpoint's fused qkv_proj, cut by split, and longrope reading seq_extent."""
    ctx = check(fuse_qkv_rope, """
graph forward {
  %0 = input() : float32[T,8] {name='x'}
  %1 = input() : int32[T] {name='positions'}
  %2 = input() : int32[T] {name='seq_ids'}
  %3 = param() : float32[16,8] {name='l.qkv_proj.weight'}
  %4 = seq_extent(%1, %2) : int32[T]
  %5 = linear(%0, %3) : float32[T,16]
  %6, %7, %8 = split(%5) : float32[T,8], float32[T,4], float32[T,4] {axis=-1, sizes=(8, 4, 4)}
  %9 = reshape(%6) : float32[T,2,4] {shape=('T', 2, 4)}
  %10 = reshape(%7) : float32[T,1,4] {shape=('T', 1, 4)}
  %11 = reshape(%8) : float32[T,1,4] {shape=('T', 1, 4)}
  %12 = rope(%9, %1, %4) : float32[T,2,4] {""" + LONGROPE + """}
  %13 = rope(%10, %1, %4) : float32[T,1,4] {""" + LONGROPE + """}
  return q=%12, k=%13, v=%11
}""", """
graph forward {
  %0 = input() : float32[T,8] {name='x'}
  %1 = input() : int32[T] {name='positions'}
  %2 = input() : int32[T] {name='seq_ids'}
  %3 = param() : float32[16,8] {name='l.qkv_proj.weight'}
  %4 = seq_extent(%1, %2) : int32[T]
  %5, %6, %7 = qkv_rope(%0, %3, %1, %4) : float32[T,2,4], float32[T,1,4], float32[T,1,4] {attention_factor=1.5, bias=False, head_dim=4, heads=2, kv_heads=1, long_factor=(1.0, 4.0), original_max_position=6, qk_norm=False, rotary_dim=4, scaling='longrope', short_factor=(1.0, 2.0), theta=10000.0}
  return q=%5, k=%6, v=%7
}""")
    assert ctx.counters["fuse_qkv_rope"]["fused"] == 1


def test_fuse_qkv_rope_carries_the_norm_offset():
    """Gemma 3: per-head q/k norms scaling by 1 + w."""
    ctx = check(fuse_qkv_rope, """
graph forward {
  %0 = input() : float32[T,8] {name='x'}
  %1 = input() : int32[T] {name='positions'}
  %2 = param() : float32[16,8] {name='l.q_proj+k_proj+v_proj.weight'}
  %3 = param() : float32[4] {name='l.q_norm.weight'}
  %4 = param() : float32[4] {name='l.k_norm.weight'}
  %5 = linear(%0, %2) : float32[T,16]
  %6, %7, %8 = split(%5) : float32[T,8], float32[T,4], float32[T,4] {axis=-1, sizes=(8, 4, 4)}
  %9 = reshape(%6) : float32[T,2,4] {shape=('T', 2, 4)}
  %10 = reshape(%7) : float32[T,1,4] {shape=('T', 1, 4)}
  %11 = reshape(%8) : float32[T,1,4] {shape=('T', 1, 4)}
  %12 = rms_norm(%9, %3) : float32[T,2,4] {eps=1e-06, offset=1.0}
  %13 = rms_norm(%10, %4) : float32[T,1,4] {eps=1e-06, offset=1.0}
  %14 = rope(%12, %1) : float32[T,2,4] {rotary_dim=4, theta=10000.0}
  %15 = rope(%13, %1) : float32[T,1,4] {rotary_dim=4, theta=10000.0}
  return q=%14, k=%15, v=%11
}""", """
graph forward {
  %0 = input() : float32[T,8] {name='x'}
  %1 = input() : int32[T] {name='positions'}
  %2 = param() : float32[16,8] {name='l.q_proj+k_proj+v_proj.weight'}
  %3 = param() : float32[4] {name='l.q_norm.weight'}
  %4 = param() : float32[4] {name='l.k_norm.weight'}
  %5, %6, %7 = qkv_rope(%0, %2, %1, %3, %4) : float32[T,2,4], float32[T,1,4], float32[T,1,4] {bias=False, eps=1e-06, head_dim=4, heads=2, kv_heads=1, offset=1.0, qk_norm=True, rotary_dim=4, theta=10000.0}
  return q=%5, k=%6, v=%7
}""")
    assert ctx.counters["fuse_qkv_rope"]["fused"] == 1


def test_fuse_add_rms_norm_after_a_post_norm_keeps_the_offset():
    """Gemma: the residual add of a post-sublayer norm's output, then the next pre-norm."""
    ctx = check(fuse_add_rms_norm, """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = input() : float32[T,4] {name='h'}
  %2 = param() : float32[4] {name='l.post_attention_layernorm.weight'}
  %3 = param() : float32[4] {name='l.pre_feedforward_layernorm.weight'}
  %4 = rms_norm(%1, %2) : float32[T,4] {eps=1e-06, offset=1.0}
  %5 = add(%0, %4) : float32[T,4]
  %6 = rms_norm(%5, %3) : float32[T,4] {eps=1e-06, offset=1.0}
  return s=%5, y=%6
}""", """
graph forward {
  %0 = input() : float32[T,4] {name='x'}
  %1 = input() : float32[T,4] {name='h'}
  %2 = param() : float32[4] {name='l.post_attention_layernorm.weight'}
  %3 = param() : float32[4] {name='l.pre_feedforward_layernorm.weight'}
  %4 = rms_norm(%1, %2) : float32[T,4] {eps=1e-06, offset=1.0}
  %5, %6 = add_rms_norm(%0, %4, %3) : float32[T,4], float32[T,4] {eps=1e-06, offset=1.0}
  return s=%5, y=%6
}""")
    assert ctx.counters["fuse_add_rms_norm"]["fused"] == 1


def test_attach_loss_takes_the_final_soft_capping_into_the_loss():
    ctx = check(attach_loss, """
graph forward {
  %0 = input() : float32[T,4] {name='h'}
  %1 = input() : int32[R] {name='logit_rows'}
  %2 = param() : float32[4] {name='model.norm.weight'}
  %3 = param() : float32[16,4] {name='model.embed_tokens.weight'}
  %4 = take_rows(%0, %1) : float32[R,4]
  %5 = rms_norm(%4, %2) : float32[R,4] {eps=1e-06, offset=1.0}
  %6 = linear(%5, %3) : float32[R,16]
  %7 = softcap(%6) : float32[R,16] {cap=30.0}
  return logits=%7
}""", """
graph forward {
  %0 = input() : float32[T,4] {name='h'}
  %1 = input() : int32[T] {name='targets'}
  %2 = input() : float32[] {name='loss_scale'}
  %3 = param() : float32[4] {name='model.norm.weight'}
  %4 = param() : float32[16,4] {name='model.embed_tokens.weight'}
  %5 = rms_norm(%0, %3) : float32[T,4] {eps=1e-06, offset=1.0}
  %6, %7 = linear_cross_entropy(%5, %4, %1, %2) : float32[], float32[T] {softcap=30.0}
  return loss=%6
}""")
    assert ctx.counters["attach_loss"] == {"rows_widened": 1, "loss_attached": 1}


def test_scale_activations_keeps_a_norm_offset():
    """AWQ-style scaling through a (1 + w) norm: the folded weight is (1 + w) / s - 1, so the function
    is unchanged."""
    src = """
graph forward {
  %0 = input() : int32[T] {name='input_ids'}
  %1 = param() : float32[16,64] {name='embed'}
  %2 = param() : float32[64] {name='norm'}
  %3 = param() : float32[96,64] {name='qkv'}
  %4 = embedding(%0, %1) : float32[T,64] {dtype='float32'}
  %5 = rms_norm(%4, %2) : float32[T,64] {eps=1e-06, offset=1.0}
  %6 = linear(%5, %3) : float32[T,96]
  return logits=%6
}"""
    rng = np.random.default_rng(4)
    w = {"embed": rng.standard_normal((16, 64)).astype(np.float32) * np.geomspace(0.1, 10, 64).astype(np.float32),
         "norm": rng.uniform(-0.5, 0.5, 64).astype(np.float32), "qkv": rng.standard_normal((96, 64)).astype(np.float32)}
    ctx = PassContext(WeightStore(w), options={"quant": "int4", "calibration_ids": rng.integers(0, 16, 40)})
    ctx.current = "scale_activations"
    g = scale_activations(parse_graph(src), ctx)
    assert print_graph(g) == print_graph(parse_graph(src)) and ctx.counters["scale_activations"]["scaled"] == 1
    new = {k: ctx.weights[k] for k in w}
    s = new["qkv"][0] / w["qkv"][0]
    assert s.max() / s.min() > 3
    np.testing.assert_allclose((1 + new["norm"]) * s, 1 + w["norm"], rtol=1e-5)
    feeds = {"input_ids": rng.integers(0, 16, 9).astype(np.int32)}
    want = ReferenceExecutor(parse_graph(src), w).run(feeds)["logits"]
    got = ReferenceExecutor(g, new).run(feeds)["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
