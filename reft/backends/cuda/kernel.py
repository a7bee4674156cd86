"""One generated CUDA kernel: the template it comes from, the values it is rendered with, the
arguments the launcher packs for it, and how its grid follows from those arguments.

Every kernel builder (gemm.py, gemv.py, attention.py, elementwise.py, ...) returns `Kernel`s; the
lowering (lower.py) only binds each `Arg` to a buffer or a scalar, and the runtime evaluates the
grid from the bound scalar arguments (`grid` holds expressions over the kernel's own i32/i64
argument names, e.g. ("cdiv(N, 128)", "cdiv(M, 128)", "1")). So a kernel's launch geometry lives
next to its template, and a signature mismatch between template and launcher is caught by
comparing `args` with the PTX `.entry` parameter list (toolchain.ptx_params), without a GPU.

Templates are Jinja2 files under templates/ (`<name>.cu.j2`); they receive `params` plus `name`
(the extern "C" symbol) and `nodes` (the IR nodes the kernel came from, printed in a comment).
"""
from __future__ import annotations

import ast
import hashlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"

# argument kinds -> (C++ parameter type, PTX .param type, bytes packed by the launcher)
ARG_KINDS = {
    "ptr": ("void*", ".u64", 8),      # any device pointer (typed in the template)
    "i32": ("int", ".u32", 4),
    "i64": ("long long", ".u64", 8),
    "f32": ("float", ".f32", 4),
    "tmap": ("const __grid_constant__ CUtensorMap", ".b8[128]", 128),   # a TMA descriptor (sm_90a)
}


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str          # a key of ARG_KINDS

    def __post_init__(self):
        if self.kind not in ARG_KINDS:
            raise ValueError(f"unknown kernel argument kind {self.kind!r}")


@dataclass(frozen=True)
class Kernel:
    name: str                          # extern "C" __global__ symbol, unique per instantiation
    template: str                      # file under templates/, e.g. "rms_norm.cu.j2"
    args: tuple[Arg, ...]              # what the launcher packs, in order
    block: tuple[int, int, int]        # threads per block
    grid: tuple[str, str, str]         # expressions over the i32/i64 args (see `launch_grid`)
    params: tuple = ()                 # sorted (key, value) pairs the template is rendered with
    smem: int = 0                      # dynamic shared memory bytes per block
    tile: str = ""                     # the tiling/launch choice in words, for `reftc inspect`
    heavy: bool = False                # CUTLASS/CuTe instantiation: slow to compile (scheduled first)
    # bytes of global scratch the kernel needs (an expression over its integer args, "0": none); the
    # launcher binds the `ptr` arg named "workspace" to that much device memory
    workspace: str = "0"
    # TMA descriptors (sm_90a): (arg name, TmaSpec) for each `tmap` arg; the runtime encodes them with
    # cuTensorMapEncodeTiled from the bound pointer arg and integer args before each launch
    tmaps: tuple = ()
    nodes: tuple[str, ...] = field(default=(), compare=False)   # IR nodes it serves (comment only)

    def __post_init__(self):
        names = [a.name for a in self.args]
        if len(set(names)) != len(names):
            raise ValueError(f"kernel {self.name}: duplicate argument names")
        scalars = {a.name for a in self.args if a.kind in ("i32", "i64")}
        for e in (*self.grid, self.workspace, *(x for _, t in self.tmaps for x in (*t.dims, *t.strides))):
            unknown = _names(e) - scalars
            if unknown:
                raise ValueError(f"kernel {self.name}: grid expression {e!r} uses {sorted(unknown)}, "
                                 "which are not integer arguments")

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]

    def render(self) -> str:
        """The kernel's CUDA C++ source."""
        return _env().get_template(self.template).render(
            **dict(self.params), name=self.name, nodes=list(self.nodes),
            signature=", ".join(f"{ARG_KINDS[a.kind][0]} {a.name}" for a in self.args))

    def launch_grid(self, values: dict[str, int]) -> tuple[int, int, int]:
        """The grid for bound integer arguments (name -> value)."""
        return tuple(max(1, int(evaluate(e, values))) for e in self.grid)


@dataclass(frozen=True)
class TmaSpec:
    """A tiled TMA descriptor over the tensor at pointer arg `tensor` (cuTensorMapEncodeTiled).
    dims/strides innermost first; dims are elements, strides bytes of dims 1.. (expressions over
    the kernel's integer args); box is the tile in elements; swizzle 0/32/64/128 bytes."""
    tensor: str
    dtype: str
    dims: tuple[str, ...]
    strides: tuple[str, ...]
    box: tuple[int, ...]
    swizzle: int = 128


def with_params(**kw) -> tuple:
    """Template parameters as the sorted, hashable tuple `Kernel.params` holds."""
    return tuple(sorted(kw.items()))


@lru_cache(maxsize=1)
def _env():
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


# -- grid expressions: integers, + - * // %, cdiv(a, b), min, max, over argument names -----------
_FUNCS = {"cdiv": lambda a, b: -(-a // b), "min": min, "max": max}


def _names(expr: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)} - set(_FUNCS)


@lru_cache(maxsize=4096)
def compile_expr(expr: str):
    """A grid expression as a function of a dict of integer values, parsed once (no Python eval of
    plan contents): ints, + - * // %, cdiv(a, b), min, max, names."""
    def build(n):
        if isinstance(n, ast.Constant) and type(n.value) is int:
            v = n.value
            return lambda env: v
        if isinstance(n, ast.Name):
            key = n.id
            return lambda env: int(env[key])
        if isinstance(n, ast.BinOp) and type(n.op) in _OPS:
            f, a, b = _OPS[type(n.op)], build(n.left), build(n.right)
            return lambda env: f(a(env), b(env))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _FUNCS and not n.keywords:
            f, args = _FUNCS[n.func.id], [build(a) for a in n.args]
            return lambda env: f(*[a(env) for a in args])
        raise ValueError(f"unsupported grid expression {expr!r}")
    try:
        return build(ast.parse(str(expr), mode="eval").body)
    except SyntaxError:
        raise ValueError(f"unsupported grid expression {expr!r}") from None


def evaluate(expr: str, values: dict[str, int]) -> int:
    return compile_expr(str(expr))(values)


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}


def source_hash(source: str, flags: list[str], nvrtc_version: tuple) -> str:
    h = hashlib.sha256()
    h.update(source.encode())
    h.update("\0".join(flags).encode())
    h.update(repr(nvrtc_version).encode())
    return h.hexdigest()[:20]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
