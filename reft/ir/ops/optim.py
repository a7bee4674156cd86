"""Optimizer ops: the global gradient norm and the AdamW update (appended by passes/add_optimizer.py).

  grad_norm_sq(g1, ..., gn) -> float32[]
      sum of the squares of every element of every gradient; the global L2 norm that clipping
      uses is its square root. One node sums all of a model's gradients, so the norm is one
      kernel, not a chain of per-parameter sums. The reference accumulates in float64; the cpu
      kernel sums fixed blocks in float32 lanes and the block sums in float64, in one order
      whatever the thread count.
  adamw_update(param, grad, m, v, lr, step[, sumsq]) -> (param, m, v)
      one AdamW step in place (outputs alias inputs 0, 2, 3; a side effect, never removed):
        c = min(1, max_norm / (sqrt(sumsq) + 1e-6))   clip coefficient (torch's clip_grad_norm_),
                                                      only with max_norm > 0 (then sumsq is given)
        g = grad * c
        param *= 1 - lr * weight_decay                decoupled weight decay
        m += (g - m) * (1 - beta1)
        v  = v * beta2 + (1 - beta2) * g * g
        param -= lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
      which is torch.optim.AdamW's single-tensor step, op for op. `lr` (float32[]) and `step`
      (int32[], counted from 1) are runtime inputs, as they change every step; betas, eps,
      weight decay and max_norm are attributes of the compiled plan. param, grad, m and v are
      float32 (fp32 master weights and optimizer state).
"""
from __future__ import annotations

import numpy as np

from ..types import TensorType
from .registry import SIDE_EFFECT, check, op

SCALAR_F32 = TensorType((), "float32")
SCALAR_I32 = TensorType((), "int32")


def _norm_infer(ts, a):
    for i, t in enumerate(ts):
        check(t.dtype == "float32", f"grad_norm_sq: gradient {i} must be float32, got {t}")
    return [SCALAR_F32]


def _norm_ref(xs, a):
    total = sum(float(np.dot(g.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64))) for g in xs)
    return [np.array(total, np.float32)]


op("grad_norm_sq", infer=_norm_infer, ref=_norm_ref, arity=(1, 1 << 16),
   doc="Sum of squares of all elements of all inputs (the squared global gradient norm).")


def _adamw_infer(ts, a):
    p, g, m, v, lr, step = ts[:6]
    check(p.dtype == "float32", f"adamw_update: param must be float32 (fp32 master weights), got {p}")
    for what, t in (("grad", g), ("m", m), ("v", v)):
        check(t == p, f"adamw_update: {what} {t} does not match param {p}")
    check(lr == SCALAR_F32, f"adamw_update: lr must be float32[], got {lr}")
    check(step == SCALAR_I32, f"adamw_update: step must be int32[], got {step}")
    clip = a["max_norm"] > 0
    check(len(ts) == 6 + clip, "adamw_update: takes sumsq (the 7th input) exactly when max_norm > 0")
    if clip:
        check(ts[6] == SCALAR_F32, f"adamw_update: sumsq must be float32[], got {ts[6]}")
    check(0 <= a["beta1"] < 1 and 0 <= a["beta2"] < 1 and a["eps"] > 0 and a["weight_decay"] >= 0,
          f"adamw_update: bad hyper-parameters beta1={a['beta1']} beta2={a['beta2']} eps={a['eps']}"
          f" weight_decay={a['weight_decay']}")
    return [p, p, p]


def clip_coefficient(sumsq, max_norm: float) -> np.float32:
    """min(1, max_norm / (norm + 1e-6)) in float32, as torch.nn.utils.clip_grad_norm_ computes it."""
    norm = np.sqrt(np.float32(sumsq))
    return np.minimum(np.float32(max_norm) / (norm + np.float32(1e-6)), np.float32(1.0))


def adamw_scalars(lr: float, step: int, a: dict) -> dict[str, np.float32]:
    """The per-step constants of the update, computed in float64 and rounded once (as torch's Python
    floats are when they meet a float32 tensor)."""
    bc1, bc2 = 1.0 - a["beta1"] ** step, 1.0 - a["beta2"] ** step
    return {"decay": np.float32(1.0 - lr * a["weight_decay"]), "a1": np.float32(1.0 - a["beta1"]),
            "b2": np.float32(a["beta2"]), "a2": np.float32(1.0 - a["beta2"]), "step_size": np.float32(lr / bc1),
            "bc2_sqrt": np.float32(np.sqrt(bc2)), "eps": np.float32(a["eps"])}


def _adamw_ref(xs, a):
    p, g, m, v, lr, step = xs[:6]
    step = int(step)
    if step < 1:
        raise ValueError(f"adamw_update: step counts from 1, got {step}")
    k = adamw_scalars(float(lr), step, a)
    if a["max_norm"] > 0:
        g = g * clip_coefficient(xs[6], a["max_norm"])
    p *= k["decay"]
    m += (g - m) * k["a1"]
    v *= k["b2"]
    v += k["a2"] * g * g
    p -= k["step_size"] * (m / (np.sqrt(v) / k["bc2_sqrt"] + k["eps"]))
    return [p, m, v]


op("adamw_update", aliases={0: 0, 1: 2, 2: 3}, infer=_adamw_infer, ref=_adamw_ref, arity=(6, 7),
   traits={SIDE_EFFECT}, attrs=("beta1", "beta2", "eps", "weight_decay"), defaults={"max_norm": 0.0},
   doc="One AdamW step (clip coefficient, decoupled weight decay, bias correction) on param, m, v in place.")
