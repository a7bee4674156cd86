"""Lower an entry graph to a list of CUDA kernel launches (the `steps` of the plan record).

Each node becomes one or more steps; a step names a Kernel (built by gemm.py, gemv.py, qgemm.py,
attention.py or elementwise.py) and binds each of its arguments, in order, to a buffer or a scalar:

  {"arena": offset}           an activation, placed by the plan_memory pass (views alias their root)
  {"input": name, "offset"}   a graph input (token ids, page tables, the KV pages)
  {"param": name, "offset"}   a weight
  {"const": name}             a small table computed here (rotary inverse frequencies)
  {"workspace": true}         the kernel's global scratch (Kernel.workspace bytes)
  {"int": "T*64"}             an expression over the step's symbol sizes
  {"f32": x}

Steps whose best kernel depends on the token count carry `rows: [SYMBOL, lo, hi]`, and the runtime
runs the one whose range holds the step's size: a GEMV for 1-8 rows, the GEMM buckets above, the
paged flash-decoding kernels for up to DECODE_MAX_T tokens and the flash-attention prefill above.

Storage: a value that only feeds matmul or attention inputs is stored in the compute dtype (half);
everything else (the residual stream, norms' sums, logits) in float32, as the IR says. A float32
value that a matmul reads is first cast into a per-node temporary after the arena.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import PlanError
from ...ir import Graph, Node, Value, ops
from ...ir.ops.nn import ROPE_DEFAULTS, rope_inv_freq
from ...passes.plan_memory import ALIGN, MemoryPlan, plan_memory
from .kernel import Kernel

HALF = ("bfloat16", "float16")
GEMV_MAX_ROWS = 8
DECODE_MAX_T = 16
ROPE_KEYS = ("theta", "rotary_dim", *ROPE_DEFAULTS)
# (op, input index) that read their input in the compute dtype
HALF_READERS = {("linear", 0), ("linear_glu", 0), ("qkv_rope", 0), ("paged_attention", 0),
                ("kv_cache_write", 2), ("kv_cache_write", 3)}
NO_CODE = frozenset({"input", "param", "reshape"})
BIG = 1 << 30


class Unsupported(PlanError):
    pass


@dataclass
class Step:
    kernel: Kernel
    args: dict
    rows: list | None = None

    def record(self) -> dict:
        return {"kernel": self.kernel.name, "rows": self.rows, "args": self.args}


@dataclass
class Lowered:
    symbols: list[str]
    inputs: list[str]
    params: list[str]
    steps: list[Step]
    constants: dict
    arena_bytes: int
    outputs: dict
    kernels: dict[str, Kernel] = field(default_factory=dict)


class Lowering:
    def __init__(self, graph: Graph, arch: str, dtype: str, max_tokens: int, plan: MemoryPlan | None = None):
        if dtype not in HALF:
            raise Unsupported(f"cuda backend: weights must be bfloat16 or float16 (--dtype), not {dtype}")
        self.g, self.arch, self.dtype, self.max_tokens = graph, arch, dtype, max_tokens
        self.plan = plan or plan_memory(graph, {"T": max_tokens, "R": max_tokens})
        self.inputs = [n.name for n in graph.inputs()]
        self.params = [n.name for n in graph.params()]
        self.steps: list[Step] = []
        self.constants: dict[str, dict] = {}
        self.temp_base = -(-self.plan.arena_bytes // ALIGN) * ALIGN
        self.temp_used = 0
        self.temp_peak = 0
        self.storage = self._choose_storage()
        syms = {d for n in graph.inputs() for d in n.out.shape if isinstance(d, str)}
        order = ("T", "R", "S", "MP", "NP")
        self.symbols = [s for s in order if s in syms] + sorted(syms - set(order))

    # -- storage -------------------------------------------------------------------------
    def _choose_storage(self) -> dict[int, str]:
        """id(root value) -> the dtype its bytes hold: half where every reader takes half."""
        readers: dict[int, list[bool]] = {}
        for n in self.g.nodes:
            for i, v in enumerate(n.inputs):
                if n.op in NO_CODE:
                    continue
                r = self.plan.root(v)
                readers.setdefault(id(r), []).append((n.op, i) in HALF_READERS)
        for v in self.g.outputs.values():
            readers.setdefault(id(self.plan.root(v)), []).append(False)
        out = {}
        for n in self.g.nodes:
            for v in n.outputs:
                r = self.plan.root(v)
                if r is v and v.dtype == "float32":
                    rs = readers.get(id(v), [])
                    out[id(v)] = self.dtype if rs and all(rs) else "float32"
        return out

    def stored(self, v: Value) -> str:
        r = self.plan.root(v)
        if r.node.op == "param" or r.node.op == "input":
            return r.dtype
        return self.storage.get(id(r), r.dtype)

    # -- bindings ------------------------------------------------------------------------
    def buf(self, v: Value) -> dict:
        r = self.plan.root(v)
        if r.node.op == "input":
            return {"input": r.node.name, "offset": 0}
        if r.node.op == "param":
            return {"param": r.node.name, "offset": 0}
        if id(r) not in self.plan.offsets:
            raise Unsupported(f"cuda backend: value of {r.node.op} has no buffer")
        return {"arena": self.plan.offsets[id(r)]}

    def temp(self, nbytes: int) -> dict:
        off = self.temp_base + self.temp_used
        self.temp_used += -(-nbytes // ALIGN) * ALIGN
        self.temp_peak = max(self.temp_peak, self.temp_used)
        return {"arena": off}

    @staticmethod
    def dim(d) -> dict:
        return {"int": str(d)}

    def rows_of(self, v: Value):
        return v.shape[0]

    def rows_max(self, v: Value) -> int:
        d = v.shape[0]
        return d if isinstance(d, int) else self.max_tokens

    def const(self, name: str, data, dtype: str = "float32") -> dict:
        self.constants.setdefault(name, {"dtype": dtype, "data": [float(x) for x in data]})
        return {"const": name}

    def launch(self, kernel: Kernel, binds: list, rows=None) -> None:
        """Bind `binds` to the kernel's args in order (tmap and workspace args are the runtime's)."""
        names = [a.name for a in kernel.args if a.kind != "tmap" and a.name != "workspace"]
        if len(names) != len(binds):
            raise Unsupported(f"cuda backend: kernel {kernel.name} takes {names}, the lowering binds {len(binds)}")
        args = dict(zip(names, binds))
        if any(a.name == "workspace" for a in kernel.args):
            args["workspace"] = {"workspace": True}
        self.steps.append(Step(kernel, args, rows))

    # -- matmuls -------------------------------------------------------------------------
    def half_input(self, x: Value, width: int) -> dict:
        """x's buffer in the compute dtype: itself, or a cast of it into a temporary."""
        if self.stored(x) == self.dtype:
            return self.buf(x)
        from .elementwise import cast_kernel

        t = self.temp(self.rows_max(x) * width * 2)
        k = cast_kernel(self.arch, self.stored(x), self.dtype, nodes=self._nodes)
        n = f"{self.rows_of(x)}*{width}" if isinstance(self.rows_of(x), str) else str(self.rows_of(x) * width)
        self.launch(k, [self.buf(x), t, {"int": n}])
        return t

    def matmul(self, x: Value, w: Value, out: dict, out_dtype: str, *, N: int, epilogue: str = "none",
               bias: Value | None = None) -> None:
        """out = epilogue(x @ w^T (+ bias)): a GEMV step for 1..8 rows and GEMM steps above."""
        K = w.shape[1]
        a = self.half_input(x, K)
        M = self.rows_of(x)
        binds = [a, self.buf(w)] + ([self.buf(bias)] if bias is not None else []) + [out]
        ints = [self.dim(M), {"int": str(N)}, {"int": str(K)}]
        wd = w.dtype
        if bias is not None and bias.dtype != "float32":
            raise Unsupported(f"cuda backend: bias {bias.node.name} must be float32, not {bias.dtype}")
        from .gemv import gemv_kernel

        kw = dict(epilogue=epilogue, bias=bias is not None, out_dtype=out_dtype, nodes=self._nodes)
        gemv = gemv_kernel(self.arch, wd, self.dtype, K=K, N=N, **kw)
        if isinstance(M, int) and M <= GEMV_MAX_ROWS:
            self.launch(gemv, binds + ints)
            return
        if not isinstance(M, int):
            self.launch(gemv, binds + ints, rows=[M, 1, GEMV_MAX_ROWS])
        lo = GEMV_MAX_ROWS + 1 if not isinstance(M, int) else M
        hi = self.max_tokens if not isinstance(M, int) else M
        if wd in HALF:
            if wd != self.dtype:
                raise Unsupported(f"cuda backend: weight {w.node.name} is {wd} in a {self.dtype} plan")
            from .gemm import bucket_for, gemm_kernel

            for blo, bhi, bucket in _ranges(bucket_for, lo, hi):
                k = gemm_kernel(self.arch, self.dtype, bucket=bucket, **kw)
                self.launch(k, binds + ints, rows=None if isinstance(M, int) else [M, blo, BIG if bhi == hi else bhi])
        else:
            from .qgemm import qgemm_kernel

            k = qgemm_kernel(self.arch, wd, self.dtype, K=K, N=N, **kw)
            self.launch(k, binds + ints, rows=None if isinstance(M, int) else [M, lo, BIG])

    # -- ops -----------------------------------------------------------------------------
    def op_embedding(self, n: Node):
        from .elementwise import embedding_kernel

        ids, table = n.inputs
        k = embedding_kernel(self.arch, table_dtype=table.dtype, hidden=table.shape[1], nodes=self._nodes)
        self.launch(k, [self.buf(ids), self.buf(table), self.buf(n.out), self.dim(ids.shape[0]),
                        {"int": str(table.shape[0])}])

    def op_rms_norm(self, n: Node):
        from .elementwise import rms_norm_kernel

        x, w = n.inputs
        self._f32(n, x, w)
        k = rms_norm_kernel(self.arch, hidden=x.shape[-1], eps=float(A(n)["eps"]), residual=False,
                            out_dtype=self.stored(n.out), offset=float(A(n)["offset"]), nodes=self._nodes)
        self.launch(k, [self.buf(x), self.buf(w), self.buf(n.out), self.dim(x.shape[0])])

    def op_add_rms_norm(self, n: Node):
        from .elementwise import rms_norm_kernel

        x, r, w = n.inputs
        self._f32(n, x, r, w)
        s, y = n.outputs
        if self.stored(s) != "float32":
            raise Unsupported("cuda backend: add_rms_norm's sum must stay float32")
        k = rms_norm_kernel(self.arch, hidden=x.shape[-1], eps=float(A(n)["eps"]), residual=True,
                            out_dtype=self.stored(y), offset=float(A(n)["offset"]), nodes=self._nodes)
        self.launch(k, [self.buf(x), self.buf(r), self.buf(w), self.buf(s), self.buf(y), self.dim(x.shape[0])])

    def op_linear(self, n: Node):
        x, w = n.inputs[:2]
        bias = n.inputs[2] if len(n.inputs) == 3 else None
        self.matmul(x, w, self.buf(n.out), self.stored(n.out), N=w.shape[0], bias=bias)

    def op_linear_glu(self, n: Node):
        x, w = n.inputs[:2]
        bias = n.inputs[2] if len(n.inputs) == 3 else None
        act = A(n)["act"]
        if act not in ("silu", "gelu_tanh"):
            raise Unsupported(f"cuda backend: linear_glu activation {act} is not supported")
        self.matmul(x, w, self.buf(n.out), self.stored(n.out), N=w.shape[0] // 2, epilogue=act, bias=bias)

    def op_qkv_rope(self, n: Node):
        from .elementwise import qkv_post_kernel

        a = A(n)
        if a["scaling"] == "yarn":
            raise Unsupported("cuda backend: yarn rope scaling is not supported")
        x, w = n.inputs[:2]
        i = 2
        bias = None
        if a["bias"]:
            bias, i = n.inputs[2], 3
        pos = n.inputs[i]
        longrope = a["scaling"] == "longrope"
        ext = n.inputs[i + 1] if longrope else None
        i += longrope
        norms = list(n.inputs[i + 1:i + 3]) if a["qk_norm"] else []
        H, Hkv, D = a["heads"], a["kv_heads"], a["head_dim"]
        width = (H + 2 * Hkv) * D
        qkv = self.temp(self.rows_max(x) * width * 4)
        self.matmul(x, w, qkv, "float32", N=width)   # the bias is added by qkv_post, before the q/k norms
        self._f32(n, *([bias] if bias is not None else []), *norms)
        ra = {k: a[k] for k in ROPE_KEYS}
        tables = [self.const(f"inv_freq_{len(self.constants)}", rope_inv_freq(ra))]
        if longrope:
            tables.append(self.const(f"inv_freq_{len(self.constants)}", rope_inv_freq(ra, long=True)))
        k = qkv_post_kernel(self.arch, self.dtype, heads=H, kv_heads=Hkv, head_dim=D, rotary_dim=a["rotary_dim"],
                            qk_norm=bool(a["qk_norm"]), eps=float(a["eps"]), bias=bool(a["bias"]),
                            offset=float(a["offset"]) if a["qk_norm"] else 0.0,
                            longrope=(int(a["original_max_position"]), float(a["attention_factor"])) if longrope
                            else None, nodes=self._nodes)
        for o in n.outputs:
            if self.stored(o) != self.dtype:
                raise Unsupported("cuda backend: qkv_rope's outputs must feed attention and the KV cache")
        binds = [qkv] + ([self.buf(bias)] if bias is not None else []) + [self.buf(v) for v in norms]
        binds += [self.buf(pos)] + ([self.buf(ext)] if longrope else []) + tables
        binds += [self.buf(o) for o in n.outputs] + [self.dim(x.shape[0])]
        self.launch(k, binds)

    def op_seq_extent(self, n: Node):
        from .elementwise import seq_extent_kernel

        pos, sid = n.inputs
        self.launch(seq_extent_kernel(self.arch, nodes=self._nodes),
                    [self.buf(pos), self.buf(sid), self.buf(n.out), self.dim(pos.shape[0])])

    def _unary(self, n: Node, op: str, value: float) -> None:
        from .elementwise import unary_kernel

        (x,) = n.inputs
        self._f32(n, x)
        if self.stored(n.out) != "float32":
            raise Unsupported(f"cuda backend: {n.op}'s output must stay float32")
        self.launch(unary_kernel(self.arch, op, value=value, nodes=self._nodes),
                    [self.buf(x), self.buf(n.out), {"int": "*".join(map(str, x.shape))}])

    def op_scale(self, n: Node):
        self._unary(n, "scale", float(A(n)["factor"]))

    def op_softcap(self, n: Node):
        self._unary(n, "softcap", float(A(n)["cap"]))

    def op_kv_cache_write(self, n: Node):
        from .elementwise import kv_write_kernel

        kc, vc, k, v, pos, sid, pt = n.inputs
        self._kv(kc)
        kern = kv_write_kernel(self.arch, self.dtype, kv_heads=kc.shape[2], head_dim=kc.shape[3],
                               page_size=kc.shape[1], nodes=self._nodes)
        self.launch(kern, [self.buf(kc), self.buf(vc), self.buf(k), self.buf(v), self.buf(pos), self.buf(sid),
                           self.buf(pt), self.dim(k.shape[0]), self.dim(pt.shape[1])])

    def op_paged_attention(self, n: Node):
        from .attention import decode_kernels, prefill_kernel

        if len(n.inputs) > 6:
            raise Unsupported("cuda backend: attention sinks are not supported")
        q, kc, vc, pos, sid, pt = n.inputs
        self._kv(kc)
        if self.stored(n.out) != self.dtype:
            raise Unsupported("cuda backend: attention output must feed a matmul")
        kw = dict(heads=q.shape[1], kv_heads=kc.shape[2], head_dim=q.shape[2], page_size=kc.shape[1],
                  sliding_window=int(A(n).get("sliding_window") or 0), scale=float(A(n)["scale"]),
                  softcap=float(A(n).get("softcap") or 0.0), nodes=self._nodes)
        binds = [self.buf(v) for v in (q, kc, vc, pos, sid, pt)] + [self.buf(n.out)]
        T = q.shape[0]
        dec = decode_kernels(self.arch, self.dtype, **kw)
        pre = prefill_kernel(self.arch, self.dtype, **kw)
        for k in dec:
            self.launch(k, binds + self._attn_ints(k, T, pt, kc), rows=[T, 1, DECODE_MAX_T])
        self.launch(pre, binds + self._attn_ints(pre, T, pt, kc), rows=[T, DECODE_MAX_T + 1, BIG])

    def _attn_ints(self, k: Kernel, T, pt: Value, kc: Value) -> list:
        """The attention kernels' integer args after the pointers, by name: tokens, pages per sequence,
        sequences, pages in the pool."""
        ints = [a.name for a in k.args if a.kind in ("i32", "i64")]
        known = {"T": self.dim(T), "MP": self.dim(pt.shape[1]), "S": self.dim(pt.shape[0]),
                 "NP": self.dim(kc.shape[0])}
        missing = [a for a in ints if a not in known]
        if missing:
            raise Unsupported(f"cuda backend: attention kernel {k.name} takes unknown ints {missing}")
        return [known[a] for a in ints]

    def op_add(self, n: Node):
        from .elementwise import add_kernel

        a, b = n.inputs
        self._f32(n, a, b)
        if tuple(a.shape) != tuple(b.shape):
            raise Unsupported("cuda backend: add of different shapes (broadcast) is not supported")
        self.launch(add_kernel(self.arch, nodes=self._nodes),
                    [self.buf(a), self.buf(b), self.buf(n.out), {"int": "*".join(map(str, a.shape))}])

    def op_take_rows(self, n: Node):
        from .elementwise import take_rows_kernel

        x, rows = n.inputs
        width = 1
        for d in x.shape[1:]:
            width *= d
        dt = self.stored(x)
        if self.stored(n.out) != dt:
            raise Unsupported(f"cuda backend: take_rows would convert {dt} to {self.stored(n.out)}")
        k = take_rows_kernel(self.arch, width=width, dtype=dt, nodes=self._nodes)
        self.launch(k, [self.buf(x), self.buf(rows), self.buf(n.out), self.dim(rows.shape[0])])

    # -- checks --------------------------------------------------------------------------
    def _f32(self, n: Node, *vals: Value) -> None:
        for v in vals:
            if self.stored(v) != "float32":
                raise Unsupported(f"cuda backend: {n.op} reads {v.dtype} stored as {self.stored(v)}; "
                                  "it takes float32")

    def _kv(self, kc: Value) -> None:
        if kc.dtype != self.dtype:
            raise Unsupported(f"cuda backend: the KV cache is {kc.dtype} in a {self.dtype} plan (--kv-dtype "
                              f"must be {self.dtype})")

    # -- driver --------------------------------------------------------------------------
    def run(self) -> Lowered:
        for i, n in enumerate(self.g.nodes):
            if n.op in NO_CODE:
                continue
            fn = getattr(self, f"op_{n.op}", None)
            if fn is None:
                raise Unsupported(f"cuda backend: op {n.op} is not supported")
            names = [v.node.name for v in n.inputs if v.node.op == "param"]
            self._nodes = (f"node {i}: {n.op}" + (f" [{names[0]}]" if names else ""),)
            self.temp_used = 0
            fn(n)
        outputs = {}
        for name, v in self.g.outputs.items():
            r = self.plan.root(v)
            if r.node.op == "param":
                raise Unsupported(f"cuda backend: output {name} is a weight; outputs must be computed")
            if self.stored(v) != v.dtype:
                raise Unsupported(f"cuda backend: output {name} would be stored as {self.stored(v)}")
            outputs[name] = {"bind": self.buf(v), "dtype": v.dtype, "shape": list(v.shape)}
        kernels = {}
        for s in self.steps:
            if kernels.setdefault(s.kernel.name, s.kernel) != s.kernel:
                raise Unsupported(f"cuda backend: two different kernels are named {s.kernel.name}")
        return Lowered(self.symbols, self.inputs, self.params, self.steps, self.constants,
                       self.temp_base + self.temp_peak, outputs, kernels)


def A(n: Node) -> dict:
    """A node's attributes with the op's defaults filled in."""
    return ops.get(n.op).full_attrs(n.attrs)


def _ranges(bucket_for, lo: int, hi: int) -> list[tuple[int, int, str]]:
    """[lo, hi] split into runs of equal bucket_for(m)."""
    out: list[list] = []
    for m in range(lo, hi + 1):
        b = bucket_for(m)
        if out and out[-1][2] == b:
            out[-1][1] = m
        else:
            out.append([m, m, b])
    return [tuple(r) for r in out]


def lower(graph: Graph, arch: str, dtype: str, max_tokens: int, plan: MemoryPlan | None = None) -> Lowered:
    return Lowering(graph, arch, dtype, max_tokens, plan).run()


def lowers(op: str) -> bool:
    """Whether the cuda backend has kernels for `op` (reftc's op-coverage listing)."""
    return op in NO_CODE or hasattr(Lowering, f"op_{op}")

