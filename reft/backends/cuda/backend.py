"""The cuda backend object (the Backend interface of reft/backends/base.py).

compile: each entry graph is lowered to kernel launches (lower.py); every distinct kernel is
rendered from its Jinja2 template and compiled by NVRTC into a SASS cubin for the plan's arch, in
parallel processes, cached by content hash (toolchain.py); kernels/ gets `<digest>.cu` and
`<digest>.cubin`; each launch geometry is checked against the arch's limits at the largest step
the plan allows. No GPU is needed. load: the driver-API runtime (runtime.py).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping

from ...errors import ReftError
from ..base import BackendOptions, WeightLayout
from ..registry import register
from . import arch as archs
from .kernel import evaluate


class CudaBackend:
    name = "cuda"

    @staticmethod
    def option_defaults(opts) -> dict:
        """Weights in bfloat16 unless asked otherwise; the KV cache in the weights' dtype."""
        dtype = opts.dtype or "bfloat16"
        return {"dtype": dtype, "kv_dtype": opts.kv_dtype or dtype}

    @property
    def passes(self) -> list:
        from ...passes.pipeline import CODEGEN

        return CODEGEN

    def available(self) -> bool:
        from .toolchain import available

        return available()

    def runnable(self) -> bool:
        return local_arch() is not None

    def arch(self, options: BackendOptions) -> str:
        return options.target or local_arch() or archs.DEFAULT

    def describe(self, options: BackendOptions) -> str:
        a = archs.get(self.arch(options))
        return f"{a.name} ({a.label})"

    def check_options(self, options: BackendOptions) -> None:
        if options.target is not None and options.target not in archs.ARCHS:
            raise ReftError(f"cuda backend: unknown architecture {options.target!r}; choose one of "
                            f"{', '.join(archs.ARCHS)} (--arch)")
        if options.deterministic:
            raise ReftError("--deterministic: the cuda backend has no batch-invariant kernels (its GEMMs choose tiles"
                            " and splits by batch size); use the cpu backend")
        from .toolchain import include_dirs, nvrtc_version

        nvrtc_version()
        include_dirs()

    def compile(self, graphs: Mapping, kernels_dir: Path, options: BackendOptions, memory_plans=None) -> dict:
        from .lower import lower
        from .toolchain import compile_kernels, nvrtc_version

        arch, dtype = self.arch(options), options.dtype
        plans = memory_plans or {}
        lows = {e: lower(g, arch, dtype, options.max_batch_tokens, plans.get(e)) for e, g in graphs.items()}
        kernels, users = {}, {}
        for low in lows.values():
            for name, k in low.kernels.items():
                if kernels.setdefault(name, k) != k:
                    raise ReftError(f"cuda backend: two different kernels are named {name}")
            for s in low.steps:
                seen = users.setdefault(s.kernel.name, [])
                seen += [n for n in s.kernel.nodes if n not in seen]
        sampling = _sampling_kernels(lows, arch)
        if sampling:
            for role in ("argmax", "sample"):
                k = sampling.pop(role)
                kernels[k.name], users[k.name], sampling[role] = k, list(k.nodes), k.name
        bar = _bar(len(kernels), options.progress)
        compiled = compile_kernels(list(kernels.values()), arch, progress=lambda _: bar.update(1) if bar else None)
        if bar:
            bar.close()
        a = archs.get(arch)
        records = {}
        for name, k in kernels.items():
            c = compiled[name]
            # the source as compiled, with a comment naming every IR node the kernel serves
            (kernels_dir / f"{c.digest}.cu").write_text(dataclasses.replace(k, nodes=tuple(users[name])).render())
            (kernels_dir / f"{c.digest}.cubin").write_bytes(c.cubin)
            r = c.resources
            if r.spill_stores or r.spill_loads:
                raise ReftError(f"cuda backend: kernel {name} spills registers on {arch} ({r.spill_stores} bytes)")
            records[name] = {
                "cubin": f"kernels/{c.digest}.cubin", "source": f"kernels/{c.digest}.cu",
                "args": [[x.name, x.kind] for x in k.args], "block": list(k.block), "grid": list(k.grid),
                "smem": k.smem, "workspace": k.workspace,
                "tmaps": [[n, {"tensor": t.tensor, "dtype": t.dtype, "dims": list(t.dims), "strides": list(t.strides),
                               "box": list(t.box), "swizzle": t.swizzle}] for n, t in k.tmaps],
                "tile": k.tile, "resources": r.to_json(), "nodes": users[name], "compile_seconds": round(c.seconds, 2)}
        for e, low in lows.items():
            check_geometry(a, low, records, options.max_batch_tokens)
        for role in ("argmax", "sample") if sampling else ():   # one block per row, R <= max_batch_tokens
            k, res = kernels[sampling[role]], records[sampling[role]]["resources"]
            archs.check_launch(a, k.name, k.block, (options.max_batch_tokens, 1, 1), k.smem, res["registers"],
                               res["smem"])
        entries = {e: {"inputs": low.inputs, "params": low.params, "symbols": low.symbols,
                       "arena_bytes": low.arena_bytes, "constants": low.constants,
                       "steps": [s.record() for s in low.steps], "outputs": low.outputs}
                   for e, low in lows.items()}
        major, minor = nvrtc_version()
        return {"name": self.name, "target": arch, "arch": arch, "dtype": dtype, "nvrtc": f"{major}.{minor}",
                "kernels": records, "entries": entries, **({"sampling": sampling} if sampling else {})}

    def weight_layout(self, record: dict) -> dict[str, WeightLayout]:
        return {}

    def load(self, plan, options: BackendOptions):
        from .runtime import CudaExecutable

        return CudaExecutable.from_plan(plan, options)


def _sampling_kernels(lows: dict, arch: str) -> dict:
    """Device sampling for a generate plan (its forward entry's float32 logits [R, vocab]): the
    argmax and sample kernels, so that a decode step returns token ids instead of R x vocab logits
    (CudaExecutable.run_sampled). {} for other plans."""
    from .elementwise import argmax_kernel, sample_kernel

    out = lows["forward"].outputs.get("logits") if "forward" in lows else None
    if not out or out["dtype"] != "float32" or len(out["shape"]) != 2 or not isinstance(out["shape"][1], int):
        return {}
    vocab, nodes = out["shape"][1], ("sampling of the forward entry's logits",)
    return {"entry": "forward", "output": "logits", "rows": out["shape"][0], "vocab": vocab,
            "argmax": argmax_kernel(arch, vocab=vocab, nodes=nodes), "sample": sample_kernel(arch, vocab=vocab, nodes=nodes)}


def check_geometry(a, low, records: dict, max_tokens: int) -> None:
    """Every step's launch at the largest sizes its `rows` range allows fits the arch (registers,
    shared memory, block and grid limits): a plan that would fail to launch fails to compile."""
    sizes = {"T": max_tokens, "R": max_tokens, "S": max_tokens, "MP": 1 << 12, "NP": 1 << 16}
    for s in low.steps:
        rec = records[s.kernel.name]
        local = dict(sizes)
        if s.rows:
            sym, lo, hi = s.rows
            local[sym] = min(local.get(sym, max_tokens), hi)
        ints = {}
        for name, b in s.args.items():
            if "int" in b:
                ints[name] = evaluate(b["int"], local)
        grid = s.kernel.launch_grid(ints)
        res = rec["resources"]
        archs.check_launch(a, s.kernel.name, s.kernel.block, grid, s.kernel.smem, res["registers"], res["smem"])


def local_arch() -> str | None:
    """The arch of this machine's first GPU, or None (no driver, no device)."""
    try:
        from cuda.bindings import driver as cu

        (err,) = cu.cuInit(0)
        if err != cu.CUresult.CUDA_SUCCESS:
            return None
        err, dev = cu.cuDeviceGet(0)
        if err != cu.CUresult.CUDA_SUCCESS:
            return None
        attr = cu.CUdevice_attribute
        _, major = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)
        _, minor = cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)
        return archs.from_cc(major, minor)
    except Exception:   # no libcuda (cuda.pathfinder raises its own error types), no cuda-python
        return None


def _bar(total: int, progress: bool):
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="compiling CUDA kernels", unit="kernel", leave=False)


BACKEND = register(CudaBackend())
