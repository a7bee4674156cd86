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
from .targets import check_target, compile_flags, compiler_prefix, get as get_target, host_target  # noqa: F401

TEMPLATES = Path(__file__).parent / "templates"
HEADERS = ["common.h", "simd.h", "linear.h", "quant.h", "qkv_rope.h", "attention.h", "rows.h", "elementwise.h"]
FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno", "-Werror=vla"]


def render(low: Lowered, entry: str, target: str) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template("forward.cpp.j2").render(
        version=__version__, entry=entry, target=get_target(target).describe(), tuning=get_target(target).tuning,
        headers=HEADERS, constants=low.constants,
        scratch_floats=low.scratch_floats, symbols=low.symbols, calls=low.calls)


def cache_dir() -> Path:
    return Path(os.environ.get("REFT_CACHE_DIR") or Path.home() / ".cache" / "reft" / "kernels")


def compiler(target: str | None = None) -> str:
    """The host's C++ compiler ($CXX, g++, c++), or the GNU cross compiler of a foreign target."""
    prefix = compiler_prefix(target) if target else ""
    if prefix:
        cxx = shutil.which(f"{prefix}g++")
        if not cxx:
            raise ReftError(f"cpu target {target} is cross-compiled with {prefix}g++, which is not installed"
                            f" (Debian: apt-get install g++-{prefix[:-1].replace('_', '-')})")
        return cxx
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise ReftError("the cpu backend needs a C++ compiler (g++); install it or set CXX")
    return cxx


def build(source: str, target: str, out_dir: Path) -> tuple[Path, Path]:
    """Write <hash>.cpp and compile <hash>.so into out_dir (reusing the cache). Returns both paths."""
    cxx = compiler(target)
    flags = FLAGS + compile_flags(target)
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
