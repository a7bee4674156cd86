"""Mixture-of-experts ops: routing, dispatch as data, and matmuls over stacked expert weights.

  moe_router(logits[T, E][, bias[E]]) -> ids int32[T, k], weights float32[T, k]
                                                      {top_k, mode, normalize, groups, topk_groups, scale}
  moe_dispatch(ids[T, k]) -> order int32[T, k], offsets int32[E + 1]     {experts}
  expert_linear(x[T, K], order, offsets, W[E, N, K][, b[E, N]]) -> [T, k, N]
  expert_glu(x[T, K], order, offsets, W[E, 2F, K][, b[E, 2F]]) -> [T, k, F]
                                                      {act, alpha, limit}   (fuse_glu makes it)
  expert_linear_sum(x[T, k, K], order, offsets, weights[T, k], W[E, N, K][, b[E, N]]) -> [T, N]
  swiglu_oai(gate, up) -> same shape                                     {alpha, limit}

A token's k *slots* (slot s = t * k + j: its j-th chosen expert) are the unit of work. The router
picks each token's experts by the family's rule (`mode`); `moe_dispatch` turns the choice into data
the grouped matmuls read: `order` lists the slots grouped by expert (ascending expert, each group in
slot order) and `offsets[e] .. offsets[e + 1]` is expert e's range of it, so a kernel runs one matmul
per expert over exactly its tokens and never touches the weights of an expert nobody chose.

Notable:
- Router modes are a table (ROUTER_MODES: mode -> rule). `softmax_topk`: softmax over all E logits,
  the k largest probabilities, renormalised to sum 1 when `normalize` (Mixtral always; Qwen3-MoE
  with norm_topk_prob). Ties go to the lower expert id, so routing is deterministic. `topk_softmax`
  (GPT-OSS, whose router linear has a bias): the k largest logits, softmax over those k. `sigmoid_group_topk`
  (DeepSeek-V3): sigmoid scores plus a correction-bias input (ROUTER_BIAS_MODES) for choosing only,
  the best `topk_groups` of `groups` expert groups (a group scores the sum of its two best), the k
  best experts in them; weights are the unbiased scores, normalised when `normalize`, times `scale`.
- Stacked weights are [E, N, K]: expert e's matrix in Hugging Face's [out, in] layout. The weight
  (input 3, or 4 for expert_linear_sum) may be quantized like a linear's (a stack of quantized
  matrices); references dequantize it and, for llama.cpp's block types, round each activation row
  to int16 blocks exactly as a linear does, so the reference executor is the kernels' oracle.
- expert_linear_sum is the down projection: each slot's row times its expert's matrix, weighted by
  the router weight and summed per token, experts in ascending order (the kernels add them in that
  order too).
- Optional expert biases (GPT-OSS): a float row per expert after the weight, added to each slot's
  product before the activation (expert_glu) or the router weight (expert_linear_sum).
- `swiglu_oai` is GPT-OSS's gated activation, (clamp(up, -limit, limit) + 1) * g sigmoid(alpha g) with
  g = min(gate, limit); fuse_glu folds it into expert_glu (act "swiglu_oai"), as SiLU(gate) * up.
- No gradient rules yet (inference only).
"""
from __future__ import annotations

import numpy as np

from ..quantized import QTensor, quantize_activations
from ..types import TensorType
from .fused import ACTS
from .registry import CONTRACTION, ELEMENTWISE, check, f32, is_float, is_weight, op

INDEX_DTYPE = "int32"
GLU_ACTS = (*ACTS, "swiglu_oai")                  # expert_glu's gated activations
GLU_DEFAULTS = {"alpha": 1.702, "limit": 7.0}     # swiglu_oai's (transformers' GptOssConfig defaults)


# -- moe_router(logits[T, E]) -> (ids[T, k], weights[T, k])
def _softmax_topk(logits: np.ndarray, a: dict) -> tuple[np.ndarray, np.ndarray]:
    """Mixtral / Qwen3-MoE: softmax over every expert, the k most probable (lower id first on ties),
    their probabilities renormalised when `normalize`."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)                                   # (T, E)
    ids = np.argsort(-p, axis=-1, kind="stable")[:, :a["top_k"]]           # (T, k)
    w = np.take_along_axis(p, ids, axis=-1)
    if a["normalize"]:
        w = w / w.sum(axis=-1, keepdims=True)
    return ids, w


def _sigmoid_group_topk(logits: np.ndarray, a: dict, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3: sigmoid scores; the correction bias is added for choosing only. Experts form
    `groups` equal groups, each scored by the sum of its two best biased scores; the `topk_groups`
    best groups stay (lower group first on ties) and the k best biased scores among their experts are
    chosen. Weights: the unbiased scores of the chosen experts, divided by their sum (+ 1e-20) when
    `normalize`, times `scale` (routed_scaling_factor)."""
    s = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)                 # (T, E)
    choice = s + bias
    T, E = s.shape
    G = a["groups"]
    by_group = -np.sort(-choice.reshape(T, G, E // G), axis=-1)[..., :2].sum(axis=-1)     # (T, G)
    kept = np.argsort(-by_group, axis=-1, kind="stable")[:, :a["topk_groups"]]
    mask = np.zeros((T, G), bool)
    np.put_along_axis(mask, kept, True, axis=-1)
    choice = np.where(np.repeat(mask, E // G, axis=-1), choice, -np.inf)
    ids = np.argsort(-choice, axis=-1, kind="stable")[:, :a["top_k"]]     # (T, k)
    w = np.take_along_axis(s, ids, axis=-1)
    if a["normalize"]:
        w = w / (w.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    return ids, w * np.float32(a["scale"])


def _topk_softmax(logits: np.ndarray, a: dict) -> tuple[np.ndarray, np.ndarray]:
    """GPT-OSS: the k largest logits (lower id first on ties), softmax over those k only; the
    weights sum to 1 by construction (`normalize` has nothing left to do)."""
    ids = np.argsort(-logits, axis=-1, kind="stable")[:, :a["top_k"]]      # (T, k)
    top = np.take_along_axis(logits, ids, axis=-1)
    e = np.exp(top - top[:, :1])                                            # the first is the largest
    return ids, e / e.sum(axis=-1, keepdims=True)


ROUTER_MODES = {"softmax_topk": _softmax_topk, "sigmoid_group_topk": _sigmoid_group_topk,
                "topk_softmax": _topk_softmax}
# modes whose rule takes a second input: a float32[E] correction bias added to the scores for choosing
ROUTER_BIAS_MODES = frozenset({"sigmoid_group_topk"})


def _router_infer(ts, a):
    x = ts[0]
    check(is_float(x) and x.rank == 2 and isinstance(x.shape[1], int), f"moe_router: logits must be float[T, E], got {x}")
    check(a["mode"] in ROUTER_MODES, f"moe_router: mode must be one of {sorted(ROUTER_MODES)}, got {a['mode']!r}")
    k = a["top_k"]
    check(isinstance(k, int) and 0 < k <= x.shape[1], f"moe_router: top_k {k!r} must be in 1..{x.shape[1]}")
    _check_router_extras(ts, a, x.shape[1])
    T = x.shape[0]
    return [TensorType((T, k), INDEX_DTYPE), TensorType((T, k), "float32")]


def _check_router_extras(ts, a, E: int):
    """The correction-bias input of the modes that take one; the groups of grouped routing."""
    biased = a["mode"] in ROUTER_BIAS_MODES
    check(len(ts) == 1 + biased, f"moe_router: mode {a['mode']} takes {1 + biased} input(s), got {len(ts)}")
    if biased:
        check(is_float(ts[1]) and ts[1].shape == (E,), f"moe_router: correction bias must be float[{E}], got {ts[1]}")
    G, TG = a["groups"], a["topk_groups"]
    check(isinstance(G, int) and G > 0 and E % G == 0 and isinstance(TG, int) and 0 < TG <= G,
          f"moe_router: {E} experts do not form {G!r} groups of which {TG!r} are kept")
    check(a["top_k"] <= TG * (E // G), f"moe_router: top_k {a['top_k']} exceeds the {TG * (E // G)} experts"
          " of the kept groups")


def _router_ref(xs, a):
    ids, w = ROUTER_MODES[a["mode"]](f32(xs[0]), a, *(f32(x) for x in xs[1:]))
    return [ids.astype(np.int32), w.astype(np.float32)]


op("moe_router", infer=_router_infer, ref=_router_ref, arity=(1, 2), attrs=("top_k",),
   defaults={"mode": "softmax_topk", "normalize": True, "groups": 1, "topk_groups": 1, "scale": 1.0},
   doc="Each token's top_k experts and their weights from its router logits, by the family's rule (mode).")


# -- moe_dispatch(ids[T, k]) -> (order[T, k], offsets[E + 1])
def _dispatch_infer(ts, a):
    ids = ts[0]
    E = a["experts"]
    check(ids.dtype == INDEX_DTYPE and ids.rank == 2 and isinstance(ids.shape[1], int),
          f"moe_dispatch: ids must be int32[T, k], got {ids}")
    check(isinstance(E, int) and E > 0, f"moe_dispatch: experts must be a positive int, got {E!r}")
    return [ids, TensorType((E + 1,), INDEX_DTYPE)]


def _dispatch_ref(xs, a):
    ids = xs[0]
    flat = ids.reshape(-1)
    E = a["experts"]
    if flat.size and (flat.min() < 0 or flat.max() >= E):
        raise IndexError(f"moe_dispatch: expert id out of range [0, {E})")
    order = np.argsort(flat, kind="stable").astype(np.int32).reshape(ids.shape)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=E))]).astype(np.int32)
    return [order, offsets]


op("moe_dispatch", infer=_dispatch_infer, ref=_dispatch_ref, arity=1, attrs=("experts",),
   doc="Slots (token, choice) grouped by expert: `order` lists them by ascending expert, expert e "
       "owns order[offsets[e]:offsets[e + 1]].")


# -- the grouped matmuls
def _check_grouping(name, rows, order, offsets, w):
    """Shared shape rule: order [T, k] over `rows` tokens, offsets [E + 1], W [E, N, K]."""
    check(order.dtype == INDEX_DTYPE and order.rank == 2 and order.shape[0] == rows and isinstance(order.shape[1], int),
          f"{name}: order must be int32[{rows}, k], got {order}")
    check(is_weight(w) and w.rank == 3 and all(isinstance(d, int) for d in w.shape),
          f"{name}: weights must be stacked matrices [E, N, K], got {w}")
    check(offsets == TensorType((w.shape[0] + 1,), INDEX_DTYPE),
          f"{name}: offsets must be int32[{w.shape[0] + 1}] (E + 1), got {offsets}")


def _check_bias(name, ts, at: int, w):
    """The optional per-expert bias after the weight (input `at`): float[E, N] (GPT-OSS)."""
    check(len(ts) <= at + 1, f"{name}: takes at most {at + 1} inputs, got {len(ts)}")
    if len(ts) == at + 1:
        check(is_float(ts[at]) and ts[at].shape == w.shape[:2],
              f"{name}: bias must be float{list(w.shape[:2])} (a row per expert), got {ts[at]}")


def _expert_linear_infer(ts, a):
    x, order, offsets, w = ts[:4]
    check(is_float(x) and x.rank == 2, f"expert_linear: x must be float[T, K], got {x}")
    _check_grouping("expert_linear", x.shape[0], order, offsets, w)
    check(w.shape[2] == x.shape[1], f"expert_linear: x {x} and weights {w} disagree on K")
    _check_bias("expert_linear", ts, 4, w)
    return [TensorType((x.shape[0], order.shape[1], w.shape[1]), x.dtype)]


def expert_groups(order: np.ndarray, offsets: np.ndarray):
    """(expert, its slots) for every expert that has any, in ascending expert order."""
    flat = order.reshape(-1)
    for e in range(len(offsets) - 1):
        if offsets[e + 1] > offsets[e]:
            yield e, flat[offsets[e]:offsets[e + 1]]


def expert_matmul(rows: np.ndarray, w, e: int, bias=None) -> np.ndarray:
    """rows[n, K] (float32) times expert e's matrix transposed (+ its bias row), as a linear on that
    matrix computes it."""
    if isinstance(w, QTensor):
        if w.int16_activations:
            rows = quantize_activations(rows)
        y = rows @ w.dequantize()[e].T
    else:
        y = rows @ f32(w[e]).T
    return y if bias is None else y + f32(bias[e])


def _expert_linear_rows(x, order, offsets, w, bias=None) -> np.ndarray:
    """[T * k, N]: row s is x[s // k] times the matrix of slot s's expert (+ its bias)."""
    k = order.shape[1]
    xf = f32(x)
    y = np.zeros((order.size, w.shape[1]), np.float32)
    for e, slots in expert_groups(order, offsets):
        y[slots] = expert_matmul(xf[slots // k], w, e, bias)
    return y


def _expert_linear_ref(xs, a):
    x, order, offsets, w = xs[:4]
    y = _expert_linear_rows(x, order, offsets, w, *xs[4:])
    return [y.reshape(*order.shape, w.shape[1]).astype(x.dtype)]


op("expert_linear", quantized_input=3, infer=_expert_linear_infer, ref=_expert_linear_ref, arity=(4, 5),
   traits={CONTRACTION},
   doc="For each token t and choice j: x[t] @ W[e].T (+ b[e]) with e the expert of slot (t, j); W is "
       "[E, N, K], the optional bias [E, N].")


# -- swiglu_oai(gate, up) {alpha, limit}: GPT-OSS's clamped SwiGLU
def swiglu_oai(g: np.ndarray, u: np.ndarray, alpha: float, limit: float) -> np.ndarray:
    """(clamp(u, -limit, limit) + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit): GPT-OSS's gated
    activation, as transformers' GptOssExperts computes it (float32)."""
    g = np.minimum(f32(g), np.float32(limit))
    u = np.clip(f32(u), np.float32(-limit), np.float32(limit))
    glu = g * (np.float32(1) / (np.float32(1) + np.exp(-(g * np.float32(alpha)))))
    return ((u + np.float32(1)) * glu).astype(np.float32)


def gated(a: dict):
    """The gated product of an expert_glu's act: f(gate, up)."""
    if a["act"] == "swiglu_oai":
        return lambda g, u: swiglu_oai(g, u, a["alpha"], a["limit"])
    return lambda g, u: ACTS[a["act"]](g) * u


def _swiglu_infer(ts, a):
    g, u = ts
    check(is_float(g) and g == u, f"swiglu_oai: gate {g} and up {u} must be float tensors of one type")
    check(a["limit"] > 0, f"swiglu_oai: limit must be positive, got {a['limit']!r}")
    return [g]


op("swiglu_oai", infer=_swiglu_infer, ref=lambda xs, a: [swiglu_oai(*xs, a["alpha"], a["limit"]).astype(xs[0].dtype)],
   arity=2, traits={ELEMENTWISE}, defaults=GLU_DEFAULTS,
   doc="GPT-OSS's clamped SwiGLU: (clamp(up, -limit, limit) + 1) * g sigmoid(alpha g), g = min(gate, limit); "
       "fuse_glu folds it into expert_glu.")


def _expert_glu_infer(ts, a):
    y = _expert_linear_infer(ts, a)[0]
    n = y.shape[-1]
    check(a["act"] in GLU_ACTS, f"expert_glu: act must be one of {sorted(GLU_ACTS)}, got {a['act']!r}")
    check(n % 2 == 0, f"expert_glu: expert weight rows {n} must be even (gate then up)")
    return [TensorType(y.shape[:-1] + (n // 2,), y.dtype)]


def _expert_glu_ref(xs, a):
    x, order, offsets, w = xs[:4]
    y = _expert_linear_rows(x, order, offsets, w, *xs[4:])
    f = y.shape[-1] // 2
    h = gated(a)(y[:, :f], y[:, f:])
    return [h.reshape(*order.shape, f).astype(x.dtype)]


op("expert_glu", quantized_input=3, infer=_expert_glu_infer, ref=_expert_glu_ref, arity=(4, 5), traits={CONTRACTION},
   attrs=("act",), defaults=GLU_DEFAULTS,
   doc="Per slot, its expert's gate/up projection (+ bias [E, 2F]) with the gated activation: "
       "act(x W_g^T) * (x W_u^T), or swiglu_oai(x W_g^T, x W_u^T) {alpha, limit}; W[e] = [W_g; W_u] ([2F, K]).")


def _expert_sum_infer(ts, a):
    x, order, offsets, weights, w = ts[:5]
    check(is_float(x) and x.rank == 3, f"expert_linear_sum: x must be float[T, k, K], got {x}")
    _check_grouping("expert_linear_sum", x.shape[0], order, offsets, w)
    check(x.shape[1] == order.shape[1] and w.shape[2] == x.shape[2],
          f"expert_linear_sum: x {x}, order {order} and weights {w} disagree on k or K")
    check(is_float(weights) and weights.shape == order.shape,
          f"expert_linear_sum: router weights must be float{list(order.shape)}, got {weights}")
    _check_bias("expert_linear_sum", ts, 5, w)
    return [TensorType((x.shape[0], w.shape[1]), x.dtype)]


def _expert_sum_ref(xs, a):
    x, order, offsets, weights, w = xs[:5]
    T, k, K = x.shape
    xf, wf = f32(x).reshape(T * k, K), f32(weights).reshape(-1)
    out = np.zeros((T, w.shape[1]), np.float32)
    for e, slots in expert_groups(order, offsets):
        np.add.at(out, slots // k, wf[slots, None] * expert_matmul(xf[slots], w, e, *xs[5:]))
    return [out.astype(x.dtype)]


op("expert_linear_sum", quantized_input=4, infer=_expert_sum_infer, ref=_expert_sum_ref, arity=(5, 6),
   traits={CONTRACTION},
   doc="The experts' down projection: sum over a token's slots of weight * (x[t, j] @ W[e].T + b[e]), "
       "experts added in ascending order.")
