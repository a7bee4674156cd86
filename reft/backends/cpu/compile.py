"""Render the forward function from templates and compile it with the host C++ compiler.

Binaries are named by the hash of their source and flags; a per-user cache
(~/.cache/reft/kernels, or $REFT_CACHE_DIR) avoids recompiling an identical source.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jinja2

from ... import __version__
from ...errors import ReftError
from .lower import Lowered

TEMPLATES = Path(__file__).parent / "templates"
HEADERS = ["common.h", "linear.h", "quant.h", "qkv_rope.h", "attention.h", "rows.h", "elementwise.h"]
TARGETS = {  # name -> (compiler flags, CPU flags the host must have)
    "avx512": (["-march=x86-64-v4"], ("avx512f", "avx512bw", "avx512vl", "f16c", "fma")),
    "avx2": (["-march=x86-64-v3"], ("avx2", "f16c", "fma")),
    "generic": (["-march=x86-64"], ()),
}
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-Werror=vla"]


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_target() -> str:
    have = cpu_flags()
    for name in ("avx512", "avx2"):
        if set(TARGETS[name][1]) <= have:
            return name
    return "generic"


def check_target(target: str) -> None:
    missing = sorted(set(TARGETS[target][1]) - cpu_flags())
    if missing:
        raise ReftError(f"this plan targets cpu {target} but this CPU lacks {', '.join(missing)}; recompile the plan"
                        f" here (reftc compile ... --backend cpu)")


def render(low: Lowered, entry: str, target: str) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("forward.cpp.j2").render(
        version=__version__, entry=entry, target=target, headers=HEADERS, constants=low.constants,
        scratch_floats=low.scratch_floats, symbols=low.symbols, calls=low.calls)


def cache_dir() -> Path:
    return Path(os.environ.get("REFT_CACHE_DIR") or Path.home() / ".cache" / "reft" / "kernels")


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise ReftError("the cpu backend needs a C++ compiler (g++); install it or set CXX")
    return cxx


def build(source: str, target: str, out_dir: Path) -> tuple[Path, Path]:
    """Write <hash>.cpp and compile <hash>.so into out_dir (reusing the cache). Returns both paths."""
    cxx = compiler()
    flags = FLAGS + TARGETS[target][0]
    digest = hashlib.sha256("\n".join([source, cxx, *flags]).encode()).hexdigest()[:20]
    src, lib = out_dir / f"{digest}.cpp", out_dir / f"{digest}.so"
    src.write_text(source)
    cached = cache_dir() / f"{digest}.so"
    if cached.exists():
        shutil.copy(cached, lib)
        return src, lib
    with tempfile.TemporaryDirectory() as tmp:
        tmp_lib = Path(tmp) / lib.name
        p = subprocess.run([cxx, *flags, str(src), "-o", str(tmp_lib)], capture_output=True, text=True)
        if p.returncode != 0:
            keep = cache_dir() / f"failed-{src.name}"
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, keep)
            first = next((line for line in p.stderr.splitlines() if "error" in line), p.stderr.strip()[:200])
            raise ReftError(f"C++ compilation failed: {first.strip()} (source kept in {keep})")
        shutil.copy(tmp_lib, lib)
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_lib, cached.with_suffix(".tmp"))
            os.replace(cached.with_suffix(".tmp"), cached)
        except OSError:
            pass
    return src, lib
