"""Snapshot the C++ the cpu backend generates for the test models, or check it against a snapshot.

    python tools/codegen_snapshot.py OUT_DIR [--templates DIR]      # write a snapshot
    python tools/codegen_snapshot.py --check DIR [--templates DIR]  # fail on any difference

A refactor that should not change codegen shows no diff (STYLE.md principle 14). Every case goes
through `reftc compile`'s own Python entry (`reft.compiler.compile_model`) with the cpu backend;
the C++ compiler is replaced by a stub that only creates the library file, so no g++ runs and
the snapshot is the rendered source itself (one file per kernel source of the plan) plus the
lowering's numbers the runtime relies on (arena and scratch sizes, parameter order, outputs).

Cases: the bundled stories260K (every target, every float weight dtype, a float16
KV cache), the tiny random models of every family from tests/hf_tiny.py (needs torch and
transformers), and stories260K.gguf re-quantized to llama.cpp block types (needs the `gguf`
package and ../shared/models).

`--templates DIR` renders with another templates folder (the module attribute
`reft.backends.cpu.compile.TEMPLATES`), so two checkouts can be compared under identical templates
while someone edits them. To snapshot an older checkout, put it first on PYTHONPATH (the tool
imports whatever `reft` resolves to), with a `reft_models` link to its models/ folder beside it.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUB = "#!/bin/sh\n# codegen_snapshot: a C++ compiler that only creates its -o file\n" \
       "while [ $# -gt 0 ]; do if [ \"$1\" = -o ]; then shift; : > \"$1\"; fi; shift; done\n"
TARGETS = ("avx512", "avx2", "generic", "neon")


def cases(work: Path) -> list[tuple[str, Path, dict]]:
    """(name, model path, compile_model keyword arguments) of every snapshot case."""
    stories = ROOT / "reft" / "assets" / "stories260K"
    out = [(f"stories260K-{t}", stories, {"target": t}) for t in TARGETS]
    out += [("stories260K-float16", stories, {"target": "avx512", "dtype": "float16"}),
            ("stories260K-bfloat16", stories, {"target": "avx2", "dtype": "bfloat16"}),
            ("stories260K-kvf16-mbt64", stories, {"target": "avx512", "kv_dtype": "float16",
                                                  "max_batch_tokens": 64})]
    try:
        sys.path.insert(0, str(ROOT / "tests"))
        from hf_tiny import CASES, make_model
        for case in CASES:
            d, _ = make_model(case, work / "hf" / case)
            out.append((f"hf-{case}", d, {"target": "avx512"}))
            out.append((f"hf-{case}-bf16-avx2", d, {"target": "avx2", "dtype": "bfloat16"}))
            out.append((f"hf-{case}-int4-head", d, {"target": "avx2", "quant": "int4", "group_size": 32,
                                                    "quant_head": True}))
            if case == "llama-gqa-llama3":   # stories260K's 172-wide MLP rows do not fit int8's 32-value blocks
                out.append((f"hf-{case}-int8", d, {"target": "avx512", "quant": "int8"}))
    except ImportError as e:   # torch / transformers absent
        print(f"skipping the tiny HF models: {e}", file=sys.stderr)
    gguf = ROOT.parent / "shared" / "models" / "stories260K" / "stories260K.gguf"
    try:
        from gguf import GGMLQuantizationType as Q
        from gguf import GGUFReader
        from gguf_util import copy_gguf
    except ImportError as e:
        print(f"skipping the GGUF cases: {e}", file=sys.stderr)
        return out
    if gguf.is_file():
        out.append(("gguf-stories260K-f32", gguf, {"target": "avx512"}))
        names = [t.name for t in GGUFReader(str(gguf)).tensors if t.data.ndim == 2 and t.data.shape[-1] % 32 == 0]
        kinds = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
        mixed = copy_gguf(gguf, work / "mixed.gguf", retype={n: kinds[i % len(kinds)] for i, n in enumerate(names)})
        out.append(("gguf-stories260K-mixed-quant", mixed, {"target": "avx512"}))
        out.append(("gguf-stories260K-mixed-quant-avx2", mixed, {"target": "avx2"}))
    else:
        print(f"skipping the GGUF cases: {gguf} is absent", file=sys.stderr)
    return out


def backend_numbers(record: dict) -> dict:
    """What the runtime reads from the manifest's backend record for each entry point."""
    entries = record.get("entries") or {"forward": record["kernel"]}
    keep = ("symbols", "params", "arena_bytes", "scratch_floats", "outputs")
    return {"layouts": record.get("layouts"), "tuning": record.get("tuning"),
            "entries": {e: {k: r.get(k) for k in keep} for e, r in entries.items()},
            "kernels": record.get("kernels")}


def snapshot(out: Path, templates: Path | None, only: str | None) -> None:
    import reft.backends.cpu.compile as cpu_compile
    from reft.compiler import compile_model

    if templates is not None:
        cpu_compile.TEMPLATES = templates.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"reft from {Path(cpu_compile.__file__).parents[2]}, templates {cpu_compile.TEMPLATES}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bindir = work / "bin"
        bindir.mkdir()
        for name in ("c++", "aarch64-linux-gnu-g++"):
            (bindir / name).write_text(STUB)
            (bindir / name).chmod(0o755)
        os.environ.update(CXX=str(bindir / "c++"), REFT_CACHE_DIR=str(work / "cache"),
                          PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
        for name, model, kwargs in cases(work):
            if only and only not in name:
                continue
            plan = compile_model(model, work / "plans" / name, backend="cpu", progress=False, **kwargs)
            sources = sorted((plan / "kernels").glob("*.cpp"))
            for i, src in enumerate(sources):
                suffix = "" if len(sources) == 1 else f".{i}"
                (out / f"{name}{suffix}.cpp").write_text(src.read_text())
            record = json.loads((plan / "manifest.json").read_text())["backend"]
            (out / f"{name}.json").write_text(json.dumps(backend_numbers(record), indent=1, sort_keys=True) + "\n")
            print(f"{name}: {len(sources)} source(s)", file=sys.stderr)


def check(expected: Path, actual: Path) -> int:
    want = {p.name for p in expected.iterdir()}
    got = {p.name for p in actual.iterdir()}
    bad = 0
    for name in sorted(want | got):
        if name not in got or name not in want:
            print(f"{name}: only in {'the snapshot' if name in want else 'this run'}")
            bad += 1
            continue
        a, b = (expected / name).read_text(), (actual / name).read_text()
        if a != b:
            bad += 1
            diff = difflib.unified_diff(a.splitlines(), b.splitlines(), f"snapshot/{name}", f"now/{name}", lineterm="")
            print("\n".join(list(diff)[:40]))
    print(f"{len(want | got) - bad} of {len(want | got)} files identical" + ("" if not bad else f"; {bad} differ"))
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, help="write the snapshot here")
    ap.add_argument("--check", type=Path, metavar="DIR", help="compare with the snapshot in DIR")
    ap.add_argument("--templates", type=Path, metavar="DIR", help="render with this templates folder")
    ap.add_argument("--only", metavar="TEXT", help="only the cases whose name contains TEXT")
    args = ap.parse_args(argv)
    if bool(args.out) == bool(args.check):
        ap.error("give either OUT_DIR or --check DIR")
    if args.out:
        snapshot(args.out, args.templates, args.only)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        snapshot(Path(tmp), args.templates, args.only)
        if not args.only:
            return check(args.check, Path(tmp))
        with tempfile.TemporaryDirectory() as sub:   # compare only the cases that ran
            for p in args.check.iterdir():
                if args.only in p.name:
                    (Path(sub) / p.name).write_text(p.read_text())
            return check(Path(sub), Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
