"""Lower a graph to kernel calls for the CPU forward function.

Each node becomes one `Call` record (kernel name, template arguments, call arguments, and
the declarations it needs); the template forward.cpp.j2 only prints them. Buffers are
C++ expressions: graph inputs `in[i]`, weights `P[j]`, activations `arena + offset` from
the memory plan (views and KV-cache writes alias their source buffer).

Weight layout (choose_layouts, over every entry graph of a plan): a float matrix is packed when
every reader understands the packed layout; one that a backward op or the optimizer also reads
stays row-major and the matmul kernels see it as `rowmajor<T>` (linear.h); stacked expert weights
[E, N, K] pack expert by expert; latent attention's per-head matrices (head_linear) stay row-major.
Backward and loss ops (training), the mixture-of-experts ops (moe.h, router_grouped.h) and latent
attention (mla.h) add their headers to the source (Lowered.headers); the backward ops' cross-thread
reductions use thread 0's scratch as a shared buffer between two calls, and the cross-entropy tiles
are CE_ROWS x CE_VOCAB.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ...errors import PlanError
from ...ir import Graph, Node, Value, ops
from ...ir.ops.dropout import scale as dropout_scale
from ...ir.ops.dropout import threshold as dropout_threshold
from ...ir.ops.nn import ROPE_DEFAULTS, rope_inv_freq
from ...ir.quantized import rounds_activations
from ...passes.plan_memory import MemoryPlan, plan_memory
from .targets import get as get_target

CTYPE = {"float32": "float", "float16": "f16", "bfloat16": "bf16", "int32": "int32_t", "int64": "int64_t"}
# quantized weight dtypes -> the format tag types of templates/quant.h
CTYPE.update({q: f"{q}_t" for q in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")})
CTYPE.update({"int8": "int8_t_", "int4_g32": "int4_t_<32>", "int4_g64": "int4_t_<64>", "int4_g128": "int4_t_<128>"})
SYMBOL_ORDER = ("T", "R", "S", "MP", "NP")
RB = 8                  # rows of a packed weight block (templates/linear.h)
# consumers that read a weight matrix in the packed layout: op -> index of the weight input (the
# input the op registry says may carry a weight matrix: OpDef.quantized_input), but for the
# backward's linear_grad_input, which reads float weights row-major (and quantized ones in their blocks)
ROWMAJOR_READERS = frozenset({"linear_grad_input"})
PACKED_READERS = {op: i for op, i in ops.registry.quantized_weight_inputs().items() if op not in ROWMAJOR_READERS}
PACKED = "rows8x16"
NORM_BLOCK = 8192       # values per block of the gradient-norm sum (templates/optim.h)
RMS_GRAD_BLOCK = 32     # rows per block of rms_norm_grad's dw shares (templates/grad.h)
CE_ROWS, CE_VOCAB = 128, 1024   # token rows x vocabulary rows of one cross-entropy logits tile (templates/loss.h)
ROUTER_KERNELS = {"softmax_topk": "k_router_softmax_topk",   # moe_router mode -> its kernel (templates/moe.h)
                  "topk_softmax": "k_router_topk_softmax",
                  "sigmoid_group_topk": "k_router_sigmoid_group_topk"}   # templates/router_grouped.h
EXPERT_ACTS = {"silu": 0, "gelu_tanh": 1, "swiglu_oai": 2}     # expert_glu act -> the kernels' ACT
ROPE_KEYS = ("theta", "rotary_dim", *ROPE_DEFAULTS)


class Unsupported(PlanError):
    pass


@dataclass
class Call:
    kernel: str
    targs: list
    args: list
    comment: str
    decls: list = field(default_factory=list)


@dataclass
class Lowered:
    symbols: list[str]
    inputs: list[str]                # graph input names, in in[] order
    params: list[str]                # weight names, in P[] order
    outputs: dict[str, tuple]        # name -> (arena offset or ~input index, dtype, shape)
    calls: list[Call]
    constants: list[dict]
    arena_bytes: int
    scratch_floats: int
    layouts: dict[str, str]          # weight name -> physical layout (absent: row-major as in the IR)
    headers: list[str] = field(default_factory=list)   # kernel headers beyond compile.HEADERS (training ops)


def expr(dims) -> str:
    """C++ product of dims (ints and symbols)."""
    parts = [str(d) for d in dims if d != 1]
    return "*".join(parts) if parts else "1"


def strides(shape) -> list[str]:
    return [f"({expr(shape[i + 1:])})" for i in range(len(shape))]


class Lowering:
    def __init__(self, graph: Graph, max_tokens: int, target: str, plan: MemoryPlan | None = None,
                 layouts: dict[str, str] | None = None, tune: dict | None = None):
        self.g = graph
        self.max_tokens = max_tokens
        self.tune = tune or get_target(target).tuning   # the #defines the kernels are compiled with
        # the plan_memory pass's plan for max_tokens when the compiler ran it; planned here otherwise
        self.plan: MemoryPlan = plan or plan_memory(graph, {"T": max_tokens, "R": max_tokens})
        self.inputs = [n.name for n in graph.inputs()]
        self.params = [n.name for n in graph.params()]
        self.calls: list[Call] = []
        self.constants: list[dict] = []
        self.scratch = 64
        self.headers: list[str] = []
        self._const_ids: dict[tuple, str] = {}
        self._users: dict[int, list[Node]] | None = None
        # weights shared with other entry points of the plan are laid out for all of them (choose_layouts)
        self.layouts = choose_layouts([graph]) if layouts is None else {
            k: v for k, v in layouts.items() if k in set(self.params)}
        syms = {d for n in graph.inputs() for d in n.out.shape if isinstance(d, str)}
        self.symbols = [s for s in SYMBOL_ORDER if s in syms] + sorted(syms - set(SYMBOL_ORDER))

    def packed(self, v: Value) -> bool:
        return v.node.op == "param" and self.layouts.get(v.node.name) == PACKED

    def weight(self, n: Node, v: Value) -> tuple[str, str]:
        """(C++ weight type, pointer) of a matmul's weight: packed float weights and quantized ones
        (in their own block rows) as their dtype; any other float matrix (a weight that a backward op
        or the optimizer also reads, in training plans) as the row-major tag type rowmajor<T>."""
        if (v.type.quantized and v.node.op == "param") or self.packed(v):
            return ct(v.dtype), self.ptr(v)
        if v.type.quantized or v.dtype not in ("float32", "float16", "bfloat16"):
            raise Unsupported(f"cpu backend: {n.op} reads a {v.dtype} weight that is not a graph weight")
        t = f"rowmajor<{ct(v.dtype)}>"
        return t, self.ptr(v).replace(f"const {ct(v.dtype)}*", f"const {t}*", 1)

    # -- buffers -----------------------------------------------------------------------
    def ptr(self, v: Value, const: bool = True) -> str:
        r = self.plan.root(v)
        t = CTYPE.get(v.dtype)
        if t is None:
            raise Unsupported(f"cpu backend: dtype {v.dtype} is not supported")
        q = "const " if const else ""
        if r.node.op == "input":
            return f"(({q}{t}*)in[{self.inputs.index(r.node.name)}])"
        if r.node.op == "param":
            return f"(({q}{t}*)P[{self.params.index(r.node.name)}])"
        return f"(({q}{t}*)(arena + {self.plan.offsets[id(r)]}))"

    def out(self, v: Value) -> str:
        return self.ptr(v, const=False)

    def used(self, v: Value) -> bool:
        """Whether a node or an output of the graph reads v."""
        if self._users is None:
            self._users = self.g.users()
        return id(v) in self._users or any(o is v for o in self.g.outputs.values())

    def const_array(self, values, prefix: str) -> str:
        key = tuple(float(x) for x in values)
        if key not in self._const_ids:
            name = f"{prefix}_{len(self.constants)}"
            self.constants.append({"name": name, "data": [f"{float(x).hex()}f" if x == x else "NAN" for x in values]})
            self._const_ids[key] = name
        return self._const_ids[key]

    def need_scratch(self, floats: int) -> None:
        self.scratch = max(self.scratch, int(floats) + 64)

    def rope_tables(self, a: dict, pos: Value, ext: Value | None) -> tuple[str, list]:
        """The rope's frequency table and, for longrope, the trailing LongRope<IT> argument (the long
        factors' table, each token's seq_extent, the original context, the cos/sin scale); for YaRN
        only its cos/sin scale (when not 1)."""
        ra = {k: a[k] for k in ROPE_KEYS}
        inv = self.const_array(rope_inv_freq(ra), "inv_freq")
        if a["scaling"] == "yarn" and a["attention_factor"] != 1.0:
            return inv, [f"LongRope<{ct(pos.dtype)}>{{nullptr, nullptr, 0, {_f(a['attention_factor'])}}}"]
        if a["scaling"] != "longrope":
            return inv, []
        inv_long = self.const_array(rope_inv_freq(ra, long=True), "inv_freq")
        return inv, [f"LongRope<{ct(ext.dtype)}>{{{inv_long}, {self.ptr(ext)}, {int(a['original_max_position'])}, "
                     f"{_f(a['attention_factor'])}}}"]

    # -- driver ------------------------------------------------------------------------
    def run(self) -> Lowered:
        for i, n in enumerate(self.g.nodes):
            if n.op in NO_CODE:
                continue
            fn = EMITTERS.get(n.op)
            if fn is None:
                raise Unsupported(f"cpu backend: op {n.op} is not supported")
            before = len(self.calls)
            fn(self, n)
            for c in self.calls[before:]:
                c.comment = f"node {i}: {n.op}" + (f" ({c.comment})" if c.comment else "") + self._where(n)
        outputs = {}
        for name, v in self.g.outputs.items():   # an arena offset, or ~index of the input it aliases
            r = self.plan.root(v)
            if r.node.op == "input":
                outputs[name] = (~self.inputs.index(r.node.name), v.dtype, v.shape)
            elif id(r) in self.plan.offsets:
                outputs[name] = (self.plan.offsets[id(r)], v.dtype, v.shape)
            else:
                raise Unsupported(f"cpu backend: output {name} is a weight; outputs must be computed")
        return Lowered(self.symbols, self.inputs, self.params, outputs, self.calls, self.constants,
                       self.plan.arena_bytes, self.scratch, self.layouts, self.headers)

    def _where(self, n: Node) -> str:
        names = [v.node.name for v in n.inputs if v.node.op == "param"]
        return f" [{names[0]}]" if names else ""

    def emit(self, kernel: str, targs: list, args: list, decls=(), comment: str = "") -> None:
        self.calls.append(Call(kernel, [str(a) for a in targs], [str(a) for a in args], comment, list(decls)))

    def rows(self, v: Value) -> str:
        return expr(v.shape[:-1])

    # -- ops ---------------------------------------------------------------------------
    def op_embedding(self, n: Node):
        ids, table = n.inputs
        self.emit("k_embedding", [ct(table.dtype), ct(n.out.dtype), ct(ids.dtype), str(self.packed(table)).lower()],
                  [self.ptr(ids), expr(ids.shape), self.ptr(table), table.shape[1], self.out(n.out)])

    def _f32_activation(self, n: Node, *vals: Value) -> None:
        for v in vals:
            if v.dtype != "float32":
                raise Unsupported(f"cpu backend: {n.op} needs float32 activations, got {v.dtype}")

    def _act_scratch(self, w: Value, K: int) -> int:
        """Floats a prompt-sized matmul takes for its int16-rounded activations where the weight's
        dtype rounds them (codes, scales and their float32 values: quant.h qmatmul_rows)."""
        return self.max_tokens * (K + K // 32 + K // 2) if rounds_activations(w.dtype) else 0

    def _linear_scratch(self, w: Value, K: int) -> None:
        self.need_scratch(self.tune["GEMM_CHUNK"] * K + self._act_scratch(w, K))

    def op_linear(self, n: Node):
        x, w = n.inputs[:2]
        self._f32_activation(n, x, *n.inputs[2:])
        wt, wp = self.weight(n, w)
        K, N = w.shape[1], w.shape[0]
        self._linear_scratch(w, K)
        b = self.ptr(n.inputs[2]) if len(n.inputs) == 3 else "(const float*)0"
        self.emit("k_linear", [wt, K, N], [self.ptr(x), self.rows(x), wp, b, self.out(n.out), "scr"])

    def op_linear_glu(self, n: Node):
        x, w = n.inputs[:2]
        self._f32_activation(n, x, *n.inputs[2:])
        wt, wp = self.weight(n, w)
        K, F = w.shape[1], w.shape[0] // 2
        chunk, gemv_t = self.tune["GEMM_CHUNK"], self.tune["GEMV_MAX_T"]
        self.need_scratch(2 * max(self.max_tokens * chunk, gemv_t * F) + chunk * K
                          + self._act_scratch(w, K))
        b = self.ptr(n.inputs[2]) if len(n.inputs) == 3 else "(const float*)0"
        act = {"silu": 0, "gelu_tanh": 1}[A(n)["act"]]
        self.emit("k_linear_glu", [wt, K, F, act], [self.ptr(x), self.rows(x), wp, b, self.out(n.out), "scr"])

    def op_qkv_rope(self, n: Node):
        a = A(n)
        x, w = n.inputs[:2]
        i = 2
        b = "(const float*)0"
        if a["bias"]:
            b, i = self.ptr(n.inputs[2]), 3
        pos = n.inputs[i]
        ext = n.inputs[i + 1] if a["scaling"] == "longrope" else None
        i += ext is not None
        if ext is not None and ext.dtype != pos.dtype:
            raise Unsupported("cpu backend: qkv_rope needs positions and seq_extent of one dtype")
        qn = kn = "(const float*)0"
        if a["qk_norm"]:
            qn, kn = self.ptr(n.inputs[i + 1]), self.ptr(n.inputs[i + 2])
            for v in n.inputs[i + 1:i + 3]:
                if v.dtype != "float32":
                    raise Unsupported("cpu backend: q/k norm weights must be float32")
        self._f32_activation(n, x, *([n.inputs[2]] if a["bias"] else []))
        wt, wp = self.weight(n, w)
        H, Hkv, D, rot = a["heads"], a["kv_heads"], a["head_dim"], a["rotary_dim"]
        K = w.shape[1]
        chunk, gemv_t = self.tune["GEMM_CHUNK"], self.tune["GEMV_MAX_T"]
        self.need_scratch(self.max_tokens * rot + max(self.max_tokens * max(chunk, D), gemv_t * (H + 2 * Hkv) * D)
                          + max(chunk, D) * K + self._act_scratch(w, K))
        inv, longrope = self.rope_tables(a, pos, ext)
        q, k, v = (self.out(o) for o in n.outputs)
        norm_off = a["offset"] if a["qk_norm"] else 0.0
        extra = [_f(norm_off), *longrope] if norm_off or longrope else []     # else the kernel's defaults
        self.emit("k_qkv_rope", [wt, ct(pos.dtype), K, H, Hkv, D, rot],
                  [self.ptr(x), expr(x.shape[:1]), wp, b, self.ptr(pos), qn, kn, f"{float(a['eps']).hex()}f",
                   inv, q, k, v, "scr", *extra])

    def op_rms_norm(self, n: Node):
        x, w = n.inputs
        off = _offset(n)
        self.emit("k_rms_norm", [ct(x.dtype), ct(w.dtype)] + off[:1],
                  [self.ptr(x), self.ptr(w), self.rows(x), x.shape[-1], f"{float(A(n)['eps']).hex()}f", self.out(n.out),
                   *off[1:]])

    def op_add_rms_norm(self, n: Node):
        x, r, w = n.inputs
        self._f32_activation(n, x, r)
        s, y = n.outputs
        off = _offset(n)
        self.emit("k_add_rms_norm", [ct(w.dtype)] + off[:1],
                  [self.ptr(x), self.ptr(r), self.ptr(w), self.rows(x), x.shape[-1],
                   f"{float(A(n)['eps']).hex()}f", self.out(s), self.out(y), *off[1:]])

    def op_softmax(self, n: Node):
        x = n.inputs[0]
        self.emit("k_softmax", [ct(x.dtype)], [self.ptr(x), self.rows(x), x.shape[-1], self.out(n.out)])

    def _rope_ext(self, n: Node) -> Value | None:
        pos, ext = n.inputs[1], (n.inputs[2] if len(n.inputs) == 3 else None)
        if ext is not None and ext.dtype != pos.dtype:
            raise Unsupported(f"cpu backend: {n.op} needs positions and seq_extent of one dtype")
        return ext

    def op_rope(self, n: Node):
        x, pos = n.inputs[:2]
        a = A(n)
        inv, longrope = self.rope_tables(a, pos, self._rope_ext(n))
        self.emit("k_rope", [ct(x.dtype), ct(pos.dtype), x.shape[1], x.shape[2], a["rotary_dim"]],
                  [self.ptr(x), self.ptr(pos), expr(x.shape[:1]), inv, self.out(n.out), *longrope])

    def op_seq_extent(self, n: Node):
        pos, sid = n.inputs
        self.emit("k_seq_extent", [ct(pos.dtype), ct(sid.dtype)],
                  [self.ptr(pos), self.ptr(sid), expr(pos.shape), self.out(n.out)])

    def op_take_rows(self, n: Node):
        x, rows = n.inputs
        rowbytes = f"{expr(x.shape[1:])}*{_size(x.dtype)}"
        self.emit("k_take_rows", [ct(rows.dtype)], [f"(const char*){self.ptr(x)}", self.ptr(rows),
                                                        expr(rows.shape), rowbytes, f"(char*){self.out(n.out)}"])

    def op_kv_cache_write(self, n: Node):
        kc, vc, k, v, pos, sid, table = n.inputs
        self._f32_activation(n, k, v)
        if pos.dtype != sid.dtype:
            raise Unsupported("cpu backend: positions and seq_ids must share a dtype")
        PS, Hkv, D = kc.shape[1], kc.shape[2], kc.shape[3]
        self.emit("k_kv_cache_write", [ct(kc.dtype), ct(pos.dtype), ct(table.dtype), PS, Hkv, D],
                  [self.out(n.outputs[0]), self.out(n.outputs[1]), self.ptr(k), self.ptr(v), self.ptr(pos),
                   self.ptr(sid), self.ptr(table), expr(k.shape[:1]), table.shape[1]])

    def _sinks(self, n: Node, at: int, cap: list) -> list:
        """The attention kernels' trailing arguments: the soft-cap value (when capping, or when sinks
        follow it), then the sinks (input `at`, float32[H]) if the node has them."""
        if len(n.inputs) <= at:
            return cap[1:]
        self._f32_activation(n, n.inputs[at])
        return [cap[1] if cap else _f(0.0), self.ptr(n.inputs[at])]

    def op_paged_attention(self, n: Node):
        q, kc, vc, pos, sid, table = n.inputs[:6]
        self._f32_activation(n, q)
        if pos.dtype != sid.dtype:
            raise Unsupported("cpu backend: positions and seq_ids must share a dtype")
        PS, Hkv, D = kc.shape[1], kc.shape[2], kc.shape[3]
        cap = _softcap(n)
        self.emit("k_paged_attention", [ct(kc.dtype), ct(pos.dtype), ct(table.dtype), PS, q.shape[1], Hkv, D] + cap[:1],
                  [self.ptr(q), self.ptr(kc), self.ptr(vc), self.ptr(pos), self.ptr(sid), self.ptr(table),
                   expr(q.shape[:1]), table.shape[1], f"{float(A(n)['scale']).hex()}f",
                   A(n)["sliding_window"], self.out(n.out), *self._sinks(n, 6, cap)])

    def op_causal_attention(self, n: Node):
        q, k, v, pos, sid = n.inputs[:5]
        if not (q.dtype == k.dtype == v.dtype) or pos.dtype != sid.dtype:
            raise Unsupported("cpu backend: causal_attention needs q/k/v of one dtype and index inputs of one dtype")
        if v.shape != k.shape:
            raise Unsupported("cpu backend: causal_attention needs values as wide as the keys")
        cap = _softcap(n)
        self.emit("k_causal_attention", [ct(q.dtype), ct(pos.dtype), q.shape[1], k.shape[1], q.shape[2]] + cap[:1],
                  [self.ptr(q), self.ptr(k), self.ptr(v), self.ptr(pos), self.ptr(sid), expr(q.shape[:1]),
                   f"{float(A(n)['scale']).hex()}f", A(n)["sliding_window"], self.out(n.out),
                   *self._sinks(n, 5, cap)])

    def op_grad_norm_sq(self, n: Node):
        """Two calls (templates/optim.h): per-block sums into thread 0's scratch, then their fold."""
        sizes = [self.bound_numel(n, g) for g in n.inputs]
        self.need_scratch(sum(-(-s // NORM_BLOCK) for s in sizes))
        tag = len(self.calls)
        decls = [f"const float* const gp{tag}[] = {{{', '.join(self.ptr(g) for g in n.inputs)}}};",
                 _array(f"gn{tag}", [expr(g.shape) for g in n.inputs])]
        nt = len(n.inputs)
        self.emit("k_grad_norm_blocks", [], [f"gp{tag}", f"gn{tag}", nt, "scratch"], decls, "block sums")
        self.emit("k_grad_norm_fold", [], ["scratch", f"gn{tag}", nt, self.out(n.out)], decls[1:], "fold")

    def bound_numel(self, n: Node, v: Value) -> int:
        """Elements of v at the largest batch (T and R bound to max_tokens)."""
        if any(isinstance(d, str) and d not in ("T", "R") for d in v.shape):
            raise Unsupported(f"cpu backend: {n.op} needs static shapes (or T, R), got {v.type}")
        return int(np.prod([self.max_tokens if isinstance(d, str) else d for d in v.shape], dtype=np.int64))

    def op_adamw_update(self, n: Node):
        p, g, m, v, lr, step = n.inputs[:6]
        a = A(n)
        clip = a["max_norm"] > 0
        sumsq = self.ptr(n.inputs[6]) if clip else "(const float*)0"
        self.emit("k_adamw", [str(clip).lower()],
                  [self.out(n.outputs[0]), self.ptr(g), self.out(n.outputs[1]), self.out(n.outputs[2]),
                   expr(p.shape), self.ptr(lr), self.ptr(step), sumsq,
                   *(float(a[k]).hex() for k in ("beta1", "beta2", "eps", "weight_decay", "max_norm"))])

    # -- backward and loss ops (templates/grad.h, attention_grad.h, loss.h) ------------------------
    def _train(self, n: Node, *headers: str) -> None:
        """Backward ops read and write float32 activations; their kernels' headers join the source."""
        for h in ("grad.h", *headers):
            if h not in self.headers:
                self.headers.append(h)

    def op_zeros_like(self, n: Node):
        self._train(n)
        self.emit("k_zero_bytes", [], [f"(char*){self.out(n.out)}", f"{expr(n.out.shape)}*{_size(n.out.dtype)}"])

    def op_sum_rows(self, n: Node):
        self._train(n)
        x = n.inputs[0]
        C = expr(x.shape[1:])
        self.need_scratch(self.bound_numel(n, n.out))
        self.emit("k_sum_rows", [ct(x.dtype)], [self.ptr(x), expr(x.shape[:1]), C, self.out(n.out), "scr"])

    def op_scatter_rows(self, n: Node):
        self._train(n)
        base, rows, src = n.inputs
        self.emit("k_scatter_rows", [ct(base.dtype), ct(rows.dtype)],
                  [self.ptr(base), expr(base.shape[:1]), self.ptr(rows), expr(rows.shape), self.ptr(src),
                   expr(base.shape[1:]), self.out(n.out)])

    def op_linear_grad_input(self, n: Node):
        self._train(n)
        dy, w = n.inputs
        N, K = w.shape
        if w.type.quantized:    # a LoRA base in its GGUF blocks: decoded a chunk of rows at a time
            if not rounds_activations(w.dtype):
                raise Unsupported(f"cpu backend: linear_grad_input reads llama.cpp block types, not {w.dtype}")
            wt, wp = self.weight(n, w)
            self.need_scratch(self.tune["GEMM_CHUNK"] * K)
            self.emit("k_linear_grad_input_q", [wt], [self.ptr(dy), self.rows(dy), N, wp, K, self.out(n.out), "scr"])
            return
        if w.dtype != "float32":
            self.need_scratch(self.tune["GEMM_CHUNK"] * K)
        self.emit("k_linear_grad_input", [ct(w.dtype)], [self.ptr(dy), self.rows(dy), N, self.ptr(w), K,
                                                          self.out(n.out), "scr"])

    def op_linear_grad_weight(self, n: Node):
        self._train(n)
        dy, x = n.inputs
        self.emit("k_linear_grad_weight", [], [self.ptr(dy), expr(dy.shape[:1]), dy.shape[1], self.ptr(x),
                                               x.shape[1], self.out(n.out)])

    def op_rms_norm_grad(self, n: Node):
        """Two calls: dx and per-block shares of dw into shared scratch, then their fold."""
        self._train(n)
        dy, x, w = n.inputs
        D = x.shape[-1]
        rows = self.bound_numel(n, x) // D
        self.need_scratch(-(-rows // RMS_GRAD_BLOCK) * D)
        dx, dw = (self.out(o) for o in n.outputs)
        eps = f"{float(A(n)['eps']).hex()}f"
        off = _offset(n)
        self.emit("k_rms_norm_grad", [ct(w.dtype), RMS_GRAD_BLOCK] + off[:1],
                  [self.ptr(dy), self.ptr(x), self.ptr(w), self.rows(x), D, eps, dx, "scratch", *off[1:]],
                  comment="dx, dw shares")
        self.emit("k_rms_norm_grad_fold", [RMS_GRAD_BLOCK], ["scratch", self.rows(x), D, dw], comment="dw")

    def op_dropout(self, n: Node):
        self._train(n)
        x, key = n.inputs
        p, stream = A(n)["p"], A(n)["stream"]
        self.emit("k_dropout", [], [self.ptr(x), expr(x.shape), self.ptr(key), f"{stream}ull",
                                    f"{dropout_threshold(p)}ull", _f(dropout_scale(p)), self.out(n.out)])

    def op_rope_grad(self, n: Node):
        self._train(n)
        dy, pos = n.inputs[:2]
        a = A(n)
        inv, longrope = self.rope_tables(a, pos, self._rope_ext(n))
        self.emit("k_rope_grad", [ct(pos.dtype), dy.shape[1], dy.shape[2], a["rotary_dim"]],
                  [self.ptr(dy), self.ptr(pos), expr(dy.shape[:1]), inv, self.out(n.out), *longrope])

    def op_silu_grad(self, n: Node):
        self._train(n)
        self.emit("k_act_grad", [0], [self.ptr(n.inputs[0]), self.ptr(n.inputs[1]), expr(n.out.shape), self.out(n.out)])

    def op_gelu_tanh_grad(self, n: Node):
        self._train(n)
        self.emit("k_act_grad", [1], [self.ptr(n.inputs[0]), self.ptr(n.inputs[1]), expr(n.out.shape), self.out(n.out)])

    def op_softcap_grad(self, n: Node):
        self._train(n)
        self.emit("k_softcap_grad", [], [self.ptr(n.inputs[0]), self.ptr(n.inputs[1]), expr(n.out.shape),
                                         _f(A(n)["cap"]), self.out(n.out)])

    def op_softmax_grad(self, n: Node):
        self._train(n)
        dy, y = n.inputs
        self.emit("k_softmax_grad", [], [self.ptr(dy), self.ptr(y), self.rows(y), y.shape[-1], self.out(n.out)])

    def op_glu_grad(self, n: Node):
        self._train(n)
        dh, y = n.inputs
        act = {"silu": 0, "gelu_tanh": 1}[A(n)["act"]]
        self.emit("k_glu_grad", [act], [self.ptr(dh), self.ptr(y), self.rows(dh), dh.shape[-1], self.out(n.out)])

    def op_causal_attention_grad(self, n: Node):
        """Two calls: dq (and each row's logsumexp and Delta into shared scratch), then dk, dv."""
        self._train(n, "attention_grad.h")
        dout, q, k, v, out, pos, sid = n.inputs
        if pos.dtype != sid.dtype:
            raise Unsupported("cpu backend: causal_attention_grad needs positions and seq_ids of one dtype")
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
        self.need_scratch(2 * self.max_tokens * H)
        a = A(n)
        cap = _softcap(n)
        targs = [ct(pos.dtype), H, Hkv, D] + cap[:1]
        common = [self.ptr(dout), self.ptr(q), self.ptr(k), self.ptr(v)]
        rest = [self.ptr(pos), self.ptr(sid), expr(q.shape[:1]), f"{float(a['scale']).hex()}f", a["sliding_window"]]
        dq, dk, dv = (self.out(o) for o in n.outputs)
        self.emit("k_attention_grad_q", targs, [*common, self.ptr(out), *rest, dq, "scratch", *cap[1:]], comment="dq")
        self.emit("k_attention_grad_kv", targs, [*common, *rest, "scratch", dk, dv, *cap[1:]], comment="dk, dv")

    def _cross_entropy(self, n: Node) -> tuple[list, list]:
        x, head, targets = n.inputs[:3]
        if head.type.quantized:
            raise Unsupported("cpu backend: the cross-entropy head must be a float matrix")
        T, (V, D) = expr(x.shape[:1]), head.shape
        cap = _softcap(n)
        return ([ct(head.dtype), ct(targets.dtype), CE_ROWS, CE_VOCAB] + cap[:1],
                [self.ptr(x), T, D, self.ptr(head), V, self.ptr(targets), int(A(n)["ignore_index"])], cap[1:])

    def op_linear_cross_entropy(self, n: Node):
        """Two calls: lse and per-row losses (shared scratch [T]), then the loss, their scaled sum."""
        self._train(n, "loss.h")
        targs, args, cap = self._cross_entropy(n)
        D, m = n.inputs[1].shape[1], self.max_tokens
        self.need_scratch(m + CE_ROWS * CE_VOCAB + CE_VOCAB * D + 3 * CE_ROWS)
        loss, lse = (self.out(o) for o in n.outputs)
        self.emit("k_linear_cross_entropy", targs, [*args, lse, "scratch", f"scr + {m}", *cap],
                  comment="lse, row losses")
        self.emit("k_cross_entropy_sum", [], ["scratch", expr(n.inputs[0].shape[:1]), self.ptr(n.inputs[3]), loss],
                  comment="loss")

    def op_linear_cross_entropy_grad(self, n: Node):
        """Two calls: dhead and each thread's share of dx (in its own scratch), then dx, the shares' sum."""
        self._train(n, "loss.h")
        targs, args, cap = self._cross_entropy(n)
        scale, lse = n.inputs[3:5]
        dloss = self.ptr(n.inputs[5]) if len(n.inputs) == 6 else "(const float*)0"
        D, part = n.inputs[1].shape[1], self.max_tokens * n.inputs[1].shape[1]
        self.need_scratch(part + CE_ROWS * CE_VOCAB + CE_VOCAB * D)
        dx, dhead = (self.out(o) for o in n.outputs)
        if not self.used(n.outputs[1]):   # a frozen head: no dhead sgemm
            dhead = "(float*)0"
        self.emit("k_linear_cross_entropy_grad", targs, [*args, self.ptr(scale), self.ptr(lse), dloss, dhead, "scr",
                                                         f"scr + {part}", *cap], comment="dhead, shares of dx")
        # the shares sit at the start of every thread's scratch, reft_scratch_floats() apart
        self.emit("k_cross_entropy_dx", [], ["scratch", "reft_scratch_floats()", expr(n.inputs[0].shape[:1]), D, dx],
                  comment="dx")

    def _binary(self, n: Node, code: str):
        x, y = n.inputs
        o = n.out
        t = [code, ct(x.dtype), ct(y.dtype), ct(o.dtype)]
        if x.shape == y.shape == o.shape:
            self.emit("k_binary_flat", t, [self.ptr(x), self.ptr(y), self.out(o), expr(o.shape)])
            return
        rank = len(o.shape)
        tag = len(self.calls)
        decls = [_array(f"sh{tag}", [str(d) for d in o.shape]), _array(f"xs{tag}", _bstrides(x.shape, o.shape)),
                 _array(f"ys{tag}", _bstrides(y.shape, o.shape))]
        self.emit("k_binary", t, [self.ptr(x), self.ptr(y), self.out(o), rank, f"sh{tag}", f"xs{tag}", f"ys{tag}"], decls)

    def op_add(self, n: Node):
        self._binary(n, "OP_ADD")

    def op_mul(self, n: Node):
        self._binary(n, "OP_MUL")

    def _unary(self, n: Node, code: str):
        x = n.inputs[0]
        self.emit("k_unary", [code, ct(x.dtype), ct(n.out.dtype)], [self.ptr(x), self.out(n.out), expr(x.shape)])

    def op_silu(self, n: Node):
        self._unary(n, "UN_SILU")

    def op_gelu_tanh(self, n: Node):
        self._unary(n, "UN_GELU_TANH")

    def op_scale(self, n: Node):
        x = n.inputs[0]
        self.emit("k_scale", [ct(x.dtype), ct(n.out.dtype)], [self.ptr(x), self.out(n.out), expr(x.shape),
                                                               _f(A(n)["factor"])])

    def op_softcap(self, n: Node):
        x = n.inputs[0]
        self.emit("k_softcap", [ct(x.dtype), ct(n.out.dtype)], [self.ptr(x), self.out(n.out), expr(x.shape),
                                                                 _f(A(n)["cap"])])

    def op_cast(self, n: Node):
        x, o = n.inputs[0], n.out
        if x.dtype.startswith("int") and o.dtype.startswith("int"):
            self.emit("k_cast_int", [ct(x.dtype), ct(o.dtype)], [self.ptr(x), self.out(o), expr(x.shape)])
        else:
            self._unary(n, "UN_CAST")

    def _copy(self, src: str, dst: str, shape, ss, ds, dtype: str):
        tag = len(self.calls)
        decls = [_array(f"sh{tag}", [str(d) for d in shape]), _array(f"ss{tag}", ss), _array(f"ds{tag}", ds)]
        self.emit("k_copy_nd", [ct(dtype)], [src, dst, len(shape), f"sh{tag}", f"ss{tag}", f"ds{tag}"], decls)

    def op_transpose(self, n: Node):
        x, o = n.inputs[0], n.out
        xs = strides(x.shape)
        self._copy(self.ptr(x), self.out(o), o.shape, [xs[p] for p in A(n)["perm"]], strides(o.shape), x.dtype)

    def op_split(self, n: Node):
        x = n.inputs[0]
        ax = A(n)["axis"] % len(x.shape)
        xs = strides(x.shape)
        at = 0
        for o, size in zip(n.outputs, A(n)["sizes"]):
            self._copy(f"({self.ptr(x)} + {at}*{xs[ax]})", self.out(o), o.shape, xs, strides(o.shape), x.dtype)
            at += size

    def op_concat(self, n: Node):
        o = n.out
        ax = A(n)["axis"] % len(o.shape)
        os_ = strides(o.shape)
        at = 0
        for x in n.inputs:
            self._copy(self.ptr(x), f"({self.out(o)} + {at}*{os_[ax]})", x.shape, strides(x.shape), os_, x.dtype)
            at += x.shape[ax]

    # -- LoRA adapter slots (templates/lora.h, included only by plans compiled with --max-loras) --
    def op_lora_add(self, n: Node):
        y, x, a, b, ids = n.inputs
        if "lora.h" not in self.headers:
            self.headers.append("lora.h")
        _, R, K = a.shape
        N = b.shape[2]
        self.emit("k_lora_add", [K, N, R], [self.ptr(y), self.ptr(x), self.rows(x), self.ptr(a), self.ptr(b),
                                            self.ptr(ids), self.out(n.out)])

    # -- mixture of experts (templates/moe.h, included only by plans that route) --------------
    def _moe(self, n: Node, *activations: Value) -> None:
        self._f32_activation(n, *activations)
        if "moe.h" not in self.headers:
            self.headers.append("moe.h")

    def _expert_scratch(self, w: Value, K: int, rows_out: int) -> None:
        """Gathered rows [T, K], their results [T, rows_out], then the matmul's own scratch."""
        self.need_scratch(self.max_tokens * (K + rows_out) + self.tune["GEMM_CHUNK"] * K + self._act_scratch(w, K))

    def op_moe_router(self, n: Node):
        self._moe(n)
        x = n.inputs[0]
        a = A(n)
        ids, w = n.outputs
        targs = [ct(x.dtype), x.shape[1], a["top_k"], str(a["normalize"]).lower()]
        args = [self.ptr(x), expr(x.shape[:1]), self.out(ids), self.out(w)]
        if len(n.inputs) == 2:   # grouped routing with a correction bias: groups, kept groups; bias, scale
            self._f32_activation(n, n.inputs[1])
            self._header("router_grouped.h")
            targs += [a["groups"], a["topk_groups"]]
            args += [self.ptr(n.inputs[1]), _f(a["scale"])]
        self.emit(ROUTER_KERNELS[a["mode"]], targs, args)

    def op_moe_dispatch(self, n: Node):
        self._moe(n)
        ids = n.inputs[0]
        order, offsets = n.outputs
        self.emit("k_moe_dispatch", [A(n)["experts"], ids.shape[1]],
                  [self.ptr(ids), expr(ids.shape[:1]), self.out(order), self.out(offsets)])

    def _expert_bias(self, n: Node, at: int) -> list:
        """The trailing bias argument of an expert kernel (float32 [E, N] rows), if the node has one."""
        if len(n.inputs) <= at:
            return []
        self._f32_activation(n, n.inputs[at])
        return [self.ptr(n.inputs[at])]

    def op_expert_linear(self, n: Node):
        x, order, offsets, w = n.inputs[:4]
        self._moe(n, x)
        wt, wp = self.weight(n, w)
        E, N, K = w.shape
        self._expert_scratch(w, K, N)
        self.emit("k_expert_linear", [wt, E, order.shape[1], K, N],
                  [self.ptr(x), expr(x.shape[:1]), self.ptr(order), self.ptr(offsets), wp, self.out(n.out), "scr",
                   *self._expert_bias(n, 4)])

    def op_expert_glu(self, n: Node):
        x, order, offsets, w = n.inputs[:4]
        self._moe(n, x)
        wt, wp = self.weight(n, w)
        (E, _, K), F = w.shape, w.shape[1] // 2
        chunk, gemv_t = self.tune["GEMM_CHUNK"], self.tune["GEMV_MAX_T"]
        self.need_scratch(self.max_tokens * K + 2 * max(self.max_tokens * chunk, gemv_t * F) + chunk * K
                          + self._act_scratch(w, K))
        a = A(n)
        extra = self._expert_bias(n, 4)
        if a["act"] == "swiglu_oai":
            extra = [*(extra or ["(const float*)0"]), _f(a["alpha"]), _f(a["limit"])]
        self.emit("k_expert_glu", [wt, E, order.shape[1], K, F, EXPERT_ACTS[a["act"]]],
                  [self.ptr(x), expr(x.shape[:1]), self.ptr(order), self.ptr(offsets), wp, self.out(n.out), "scr",
                   *extra])

    def op_expert_linear_sum(self, n: Node):
        x, order, offsets, weights, w = n.inputs[:5]
        self._moe(n, x, weights)
        wt, wp = self.weight(n, w)
        E, N, K = w.shape
        self._expert_scratch(w, K, N)
        self.emit("k_expert_linear_sum", [wt, E, order.shape[1], K, N],
                  [self.ptr(x), expr(x.shape[:1]), self.ptr(order), self.ptr(offsets), self.ptr(weights), wp,
                   self.out(n.out), "scr", *self._expert_bias(n, 5)])

    def op_swiglu_oai(self, n: Node):
        g, u = n.inputs
        self._moe(n)
        if g.dtype != u.dtype:
            raise Unsupported("cpu backend: swiglu_oai needs gate and up of one dtype")
        a = A(n)
        self.emit("k_swiglu_oai", [ct(g.dtype), ct(n.out.dtype)],
                  [self.ptr(g), self.ptr(u), self.out(n.out), expr(g.shape), _f(a["alpha"]), _f(a["limit"])])

    # -- multi-head latent attention (templates/mla.h, included only by plans with latent attention) --
    def _header(self, name: str) -> None:
        if name not in self.headers:
            self.headers.append(name)

    def _mla(self, n: Node, pos: Value, sid: Value, *activations: Value) -> None:
        self._f32_activation(n, *activations)
        self._header("mla.h")
        if pos.dtype != sid.dtype:
            raise Unsupported(f"cpu backend: {n.op} needs positions and seq_ids of one dtype")

    def op_head_linear(self, n: Node):
        x, w = n.inputs
        self._f32_activation(n, x)
        self._header("mla.h")
        wt, wp = self.weight(n, w)
        H, N, K = w.shape
        self.need_scratch(self.max_tokens * K + self.tune["GEMM_CHUNK"] * K)
        self.emit("k_head_linear", [wt, H, K, N], [self.ptr(x), expr(x.shape[:1]), wp, self.out(n.out), "scr"])

    def op_latent_attention(self, n: Node):
        ql, qr, lat, kr, pos, sid = n.inputs
        self._mla(n, pos, sid, ql, qr, lat, kr)
        H, C, R = ql.shape[1], ql.shape[2], qr.shape[2]
        self.emit("k_latent_attention", [ct(pos.dtype), H, C, R],
                  [self.ptr(ql), self.ptr(qr), self.ptr(lat), self.ptr(kr), self.ptr(pos), self.ptr(sid),
                   expr(ql.shape[:1]), _f(A(n)["scale"]), self.out(n.out)])

    def op_latent_cache_write(self, n: Node):
        cache, lat, kr, pos, sid, table = n.inputs
        self._mla(n, pos, sid, lat, kr)
        self.emit("k_latent_cache_write", [ct(cache.dtype), ct(pos.dtype), ct(table.dtype), cache.shape[1],
                                           lat.shape[1], kr.shape[1]],
                  [self.out(n.out), self.ptr(lat), self.ptr(kr), self.ptr(pos), self.ptr(sid), self.ptr(table),
                   expr(lat.shape[:1]), table.shape[1]])

    def op_paged_latent_attention(self, n: Node):
        ql, qr, cache, pos, sid, table = n.inputs
        self._mla(n, pos, sid, ql, qr)
        H, C, R = ql.shape[1], ql.shape[2], qr.shape[2]
        self.emit("k_paged_latent_attention", [ct(cache.dtype), ct(pos.dtype), ct(table.dtype), cache.shape[1], H, C, R],
                  [self.ptr(ql), self.ptr(qr), self.ptr(cache), self.ptr(pos), self.ptr(sid), self.ptr(table),
                   expr(ql.shape[:1]), table.shape[1], _f(A(n)["scale"]), self.out(n.out)])


def ct(dtype: str) -> str:
    """C++ type of an IR dtype."""
    if dtype not in CTYPE:
        raise Unsupported(f"cpu backend: dtype {dtype} is not supported")
    return CTYPE[dtype]


def A(n: Node) -> dict:
    """A node's attributes with the op's defaults filled in."""
    return ops.get(n.op).full_attrs(n.attrs)


def _f(x: float) -> str:
    """A float32 C++ literal (hex: exact)."""
    return f"{float(x).hex()}f"


def _offset(n: Node) -> list:
    """RMSNorm offset: [] (none: the kernel's defaults), or [template flag, the value argument]."""
    off = A(n)["offset"]
    return ["true", _f(off)] if off else []


def _softcap(n: Node) -> list:
    """Soft-capping: [] (none: the kernel's defaults), or [template flag, the cap argument]."""
    cap = A(n)["softcap"]
    return ["true", _f(cap)] if cap else []


def _size(dtype: str) -> int:
    from ...ir.types import itemsize

    return itemsize(dtype)


def _array(name: str, items: list[str]) -> str:
    return f"const int64_t {name}[] = {{{', '.join(items) or '0'}}};"


# op -> the Lowering method (op_<name>) that emits its kernel calls; NO_CODE ops emit none (sources,
# and views, which alias their input's buffer)
NO_CODE = frozenset({"input", "param", "reshape"})
EMITTERS = {name[3:]: fn for name, fn in vars(Lowering).items() if name.startswith("op_")}


def lowers(op: str) -> bool:
    """Whether the cpu backend lowers `op` (tests check every registered op does, or is reference-only)."""
    return op in NO_CODE or op in EMITTERS


def _bstrides(shape, out_shape) -> list[str]:
    """Strides of `shape` broadcast to out_shape (0 on broadcast dims, missing leading dims)."""
    pad = len(out_shape) - len(shape)
    full = (1,) * pad + tuple(shape)
    st = strides(full)
    return ["0" if (i < pad or (full[i] == 1 and out_shape[i] != 1)) else st[i] for i in range(len(full))]


def pack(a: np.ndarray) -> np.ndarray:
    """[N, K] -> packed [N8/8, K16/16, 8, 16] (zero padded): the layout of templates/linear.h; a stack
    of matrices [E, N, K] (experts) matrix by matrix."""
    if a.ndim == 3:
        return np.stack([pack(m) for m in a])
    N, K = a.shape
    Np, Kp = -(-N // RB) * RB, -(-K // 16) * 16
    if (Np, Kp) != (N, K):
        b = np.zeros((Np, Kp), a.dtype)
        b[:N, :K] = a
        a = b
    return np.ascontiguousarray(a.reshape(Np // RB, RB, Kp // 16, 16).transpose(0, 2, 1, 3))


def packed_shape(shape) -> tuple:
    *lead, N, K = shape
    return (*lead, -(-N // RB), -(-K // 16), RB, 16)


def choose_layouts(graphs: list[Graph]) -> dict[str, str]:
    """Pack a weight matrix when every op reading it, in every graph, understands the packed layout
    (a weight that a backward op or the optimizer also reads stays row-major in every entry point)."""
    readers: dict[str, list[bool]] = {}
    for g in graphs:
        for n in g.nodes:
            for i, v in enumerate(n.inputs):
                if v.node.op == "param":
                    ok = (PACKED_READERS.get(n.op) == i and v.type.rank in (2, 3)
                          and v.dtype in ("float32", "float16", "bfloat16"))
                    readers.setdefault(v.node.name, []).append(ok)
    return {name: PACKED for name, oks in readers.items() if all(oks)}


def lower(graph: Graph, max_tokens: int, target: str, plan: MemoryPlan | None = None,
          layouts: dict[str, str] | None = None, tune: dict | None = None) -> Lowered:
    """tune: the tuning constants (targets.tuning); None: the target's own."""
    return Lowering(graph, max_tokens, target, plan, layouts, tune).run()
