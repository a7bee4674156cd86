"""Run the kernels of a foreign cpu target (neon on an x86-64 host) under qemu-user: tests and CI.

A plan's forward source is rendered as usual and templates/driver.cpp is appended; the target's
GNU cross compiler links one static executable. Each `run` writes the step's inputs as raw files
beside a plain-text spec (the driver's header describes it), runs the executable under
qemu-<arch> and reads back the outputs and the inputs (a step may write inputs in place: KV-cache
pages). A process per step makes this slow, but it runs the very kernels a plan for the target
holds. On a host of the target's own architecture the executable runs without qemu.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ...errors import PlanError, ReftError
from ...ir import Graph
from ...ir.types import np_dtype
from .compile import FLAGS as LIBRARY_FLAGS, TEMPLATES, cache_dir, compiler, render
from .lower import Lowered, lower, pack
from .runtime import bind_inputs, concrete
from .targets import check_target, compile_flags, compiler_prefix, get as get_target

# a plan library's flags, linked into one static executable (no aarch64 libgomp.so needed at run time)
FLAGS = [f for f in LIBRARY_FLAGS if f not in ("-shared", "-fPIC")] + ["-static"]


def runner(target: str) -> list[str]:
    """The command prefix that runs the target's executables here: [] natively, else qemu-user."""
    if not compiler_prefix(target):
        check_target(target)     # this machine's architecture: the CPU runs it natively or not at all
        return []
    arch = get_target(target).arch
    qemu = shutil.which(f"qemu-{arch}")
    if not qemu:
        raise ReftError(f"running cpu target {target} here needs qemu-{arch} (Debian: apt-get install qemu-user)")
    return [qemu]


def available(target: str) -> bool:
    """Whether this machine can compile and run the target's kernels (cross compiler and qemu)."""
    try:
        compiler(target)
        runner(target)
    except ReftError:
        return False
    return True


def _first_error(text: str) -> str:
    return next((line for line in text.splitlines() if "error" in line), text.strip()[:200]).strip()


def build_executable(low: Lowered, target: str, out: Path) -> Path:
    """Compile the rendered forward source and the driver into the executable `out`."""
    src = out.with_suffix(".cpp")
    src.write_text(render(low, "forward", target) + (TEMPLATES / "driver.cpp").read_text())
    cxx = compiler(target)
    p = subprocess.run([cxx, *FLAGS, *compile_flags(target), str(src), "-o", str(out)], capture_output=True, text=True)
    if p.returncode != 0:
        keep = cache_dir() / f"failed-{target}-{out.parent.name}.cpp"
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, keep)
        raise ReftError(f"C++ compilation for {target} failed: {_first_error(p.stderr)} (source kept in {keep})")
    return out


class CrossExecutable:
    """The forward function of a graph as an executable for `target`: run() as CpuExecutable.run."""

    def __init__(self, graph: Graph, low: Lowered, executable: Path, weights: dict[str, np.ndarray], target: str,
                 max_tokens: int, threads: int = 2, timeout: float = 300):
        self.graph, self.low, self.exe = graph, low, Path(executable)
        self.command = runner(target)
        self.max_tokens, self.threads, self.timeout = int(max_tokens), int(threads), timeout
        self.deterministic = False   # reproducible mode (CpuExecutable.set_deterministic)
        self.inputs = list(graph.inputs())
        missing = [p for p in low.params if p not in weights]
        if missing:
            raise PlanError(f"kernel parameter {missing[0]} is not a weight of the graph")
        self.dir = self.exe.parent.resolve()
        self.params = []      # spec lines of the weights, written once beside the executable
        for j, name in enumerate(low.params):
            a = np.ascontiguousarray(pack(weights[name]) if name in low.layouts else weights[name])
            a.tofile(self.dir / f"param{j}.bin")
            self.params.append(f"param {self.dir / f'param{j}.bin'} {a.nbytes}")

    supports_reproducible = True

    def set_deterministic(self, on: bool) -> None:
        self.deterministic = bool(on)

    def run(self, feeds) -> dict[str, np.ndarray]:
        keep, sizes = bind_inputs(self.inputs, feeds, self.max_tokens)
        outs = {}
        for name, (off, dtype, shape) in self.low.outputs.items():
            if off >= 0:
                count = int(np.prod(concrete(shape, sizes), dtype=np.int64))
                outs[name] = (off, count * np_dtype(dtype).itemsize)
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            step = Path(tmp)
            lines = ["dims " + " ".join(str(sizes[s]) for s in self.low.symbols)]
            for i, a in enumerate(keep):
                a.tofile(step / f"in{i}.bin")
                lines.append(f"in in{i}.bin {a.nbytes}")
            lines += self.params
            lines += [f"arena {self.low.arena_bytes}", f"scratch {self.low.scratch_floats}", f"threads {self.threads}",
                      f"deterministic {int(self.deterministic)}"]
            lines += [f"out back{i}.bin in{i} 0 {a.nbytes}" for i, a in enumerate(keep)]
            lines += [f"out out{k}.bin arena {off} {nbytes}" for k, (off, nbytes) in enumerate(outs.values())]
            (step / "spec.txt").write_text("\n".join(lines) + "\n")
            self._execute(step / "spec.txt")
            for i, a in enumerate(keep):     # in place, as the step would have written them
                back = np.fromfile(step / f"back{i}.bin", np.uint8)
                ctypes.memmove(a.ctypes.data, back.ctypes.data, a.nbytes)
            got = {name: np.fromfile(step / f"out{k}.bin", np.uint8) for k, name in enumerate(outs)}
        result = {}
        for name, (off, dtype, shape) in self.low.outputs.items():
            shp = concrete(shape, sizes)
            result[name] = keep[~off].reshape(shp) if off < 0 else got[name].view(np_dtype(dtype)).reshape(shp)
        return result

    def _execute(self, spec: Path) -> None:
        cmd = [*self.command, str(self.exe), str(spec)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise ReftError(f"{self.exe.name} ran past {self.timeout:g} s: {' '.join(cmd)}") from None
        if p.returncode != 0:
            how = f"killed by signal {-p.returncode}" if p.returncode < 0 else f"exit status {p.returncode}"
            first = next((line for line in p.stderr.splitlines() if line.strip()), "(no message)")
            raise ReftError(f"{self.exe.name} failed ({how}): {first.strip()} [{' '.join(cmd)}]")

    @staticmethod
    def zeros(shape, dtype: str):
        return np.zeros(shape, np_dtype(dtype))


def compile_graph_cross(graph: Graph, weights: dict, workdir: Path, *, target: str = "neon", max_tokens: int = 64,
                        threads: int = 2) -> CrossExecutable:
    """Lower, render and compile any graph for `target` into workdir; weights are given as arrays."""
    low = lower(graph, max_tokens, target)
    folder = Path(tempfile.mkdtemp(prefix=f"{target}-", dir=workdir))   # the executable and its weights
    exe = build_executable(low, target, folder / "forward")
    return CrossExecutable(graph, low, exe, weights, target, max_tokens, threads)


__all__ = ["available", "runner", "build_executable", "CrossExecutable", "compile_graph_cross"]
