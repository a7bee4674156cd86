#!/usr/bin/env python3
"""reft's CPU backend vs llama.cpp: same weights, same precision, same thread count, one run.

For every (model, format, threads) it measures llama-bench's two tests on both engines,
alternating them (round 1: llama.cpp then reft, round 2: reft then llama.cpp, ...):

  ppP   one batch of P prompt tokens from an empty KV cache (n_batch = n_ubatch = 512)
  tgN   N single-token decode steps from an empty KV cache
  tokens/s = tokens / seconds, mean ± stddev over all repetitions, each engine warmed up first.

llama.cpp runs in this process through llama-cpp-python's C API (tools/llamacpp_util.py:
llama_decode, n_threads = n_threads_batch = T, F16 KV cache, flash attention 'auto', n_ctx
>= P+N) on MODELS/<model>/<format>.gguf. reft runs as a subprocess:

  reftc compile MODELS/<model>/hf -o PLANS/<model>-<format>-<backend> --backend B --dtype float32|float16
  reftc compile MODELS/<model>/<format>.gguf -o ...      (q8_0, q4_0, q4_1, q4_k_m: the same quantized file)
  reft bench PLAN -p P -n N -r R --threads T --output json

The models come from tools/bench_models.py. The table adds the decode bandwidth limit:
tg t/s at which the weights (llama.cpp's model size) stream once per token at the
measured bandwidth of the machine (PERF-NOTES: about 25 GB/s on 1 thread, 40 GB/s on 2
with huge pages), and how close each engine gets to it.

Examples:
  python tools/bench_vs_llamacpp.py                                  # everything (long on the 1B model)
  python tools/bench_vs_llamacpp.py --models smollm2-135m --threads 2 -r 3
  python tools/bench_vs_llamacpp.py --llamacpp-only --models smollm2-135m --output json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import llamacpp_util as lc  # noqa: E402

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / ".cache" / "bench" / "models"
DEFAULT_PLANS_DIR = Path(__file__).resolve().parent.parent / ".cache" / "bench" / "plans"
MODELS = ("smollm2-135m", "llama-1b")
# format -> reft --dtype for float formats (reft compiles the HF folder); None for block-quantized
# GGUF formats (reft compiles the same MODELS/<model>/<format>.gguf llama.cpp reads, kept quantized)
FORMATS = {"f32": "float32", "f16": "float16", "q8_0": None, "q4_0": None, "q4_1": None, "q4_k_m": None}
REFT_KEYS = ("test", "tokens_per_s")


class BenchError(RuntimeError):
    """One line for the user."""


_T0 = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def mean_std(xs):
    return lc.mean_std(list(xs))


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def host_simd() -> str:
    """The widest cpu target of reft this host runs (avx512, avx2, neon, generic)."""
    try:
        from reft.backends.cpu.targets import host_target
    except ImportError:
        return "?"
    return host_target()


def git_rev(repo: Path) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or None
    except Exception:
        return None


def parse_bandwidth(items: list[str]) -> dict[int, float]:
    out = {}
    for it in items:
        try:
            t, g = it.split("=")
            out[int(t)] = float(g)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--bandwidth takes THREADS=GBPS pairs, got {it!r}") from None
    return out


def bandwidth_for(bw: dict[int, float], threads: int) -> float:
    keys = sorted(k for k in bw if k <= threads) or sorted(bw)
    return bw[keys[-1]]


# ----------------------------------------------------------------------------- reft side

class Reft:
    def __init__(self, reft_cmd: list[str], reftc_cmd: list[str], backend: str, plans_dir: Path, recompile: bool,
                 compile_args: list[str], timeout: float, target: str | None = None):
        self.reft, self.reftc, self.target = reft_cmd, reftc_cmd, target
        self.backend, self.plans_dir, self.recompile = backend, plans_dir, recompile
        self.compile_args, self.timeout = compile_args, timeout

    @staticmethod
    def _resolve(cmd: list[str], what: str) -> list[str]:
        if not cmd:
            raise BenchError(f"empty {what} command")
        if os.sep not in cmd[0] and shutil.which(cmd[0]) is None:
            raise BenchError(f"reft engine not available: '{cmd[0]}' not found on PATH (pip install -e . in the checkout, "
                             f"or pass --{what} CMD)")
        return cmd

    def preflight(self) -> None:
        self._resolve(self.reft, "reft")
        self._resolve(self.reftc, "reftc")
        r = subprocess.run(self.reft + ["bench", "--help"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise BenchError(f"reft engine not usable: `{shlex.join(self.reft + ['bench', '--help'])}` failed: {last[0]}")
        r = subprocess.run(self.reftc + ["compile", "--help"], capture_output=True, text=True, timeout=120)
        if r.returncode == 0 and "--backend" in r.stdout and self.backend not in r.stdout:
            raise BenchError(f"reftc compile has no backend '{self.backend}' (see `reftc compile --help`; "
                             f"choose one with --backend)")

    def plan(self, model: str, fmt: str, hf_dir: Path, gguf: Path) -> Path:
        plan = self.plans_dir / f"{model}-{fmt}-{self.backend}" if not self.target else \
            self.plans_dir / f"{model}-{fmt}-{self.backend}-{self.target}"
        if (plan / "manifest.json").is_file() and not self.recompile:
            say(f"reft: reusing plan {plan} (--recompile to rebuild)")
            return plan
        self.plans_dir.mkdir(parents=True, exist_ok=True)
        src = ["compile", str(hf_dir), "-o", str(plan), "--backend", self.backend, "--dtype", FORMATS[fmt]]
        if FORMATS[fmt] is None:
            src = ["compile", str(gguf), "-o", str(plan), "--backend", self.backend]
        cmd = self.reftc + src + (["--target", self.target] if self.target else []) + self.compile_args
        say(f"reft: {shlex.join(cmd)}")
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"reftc compile of {model} {fmt} timed out after {self.timeout:.0f}s") from None
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise BenchError(f"reftc compile of {model} {fmt} failed (exit {r.returncode}): {last[0]}")
        say(f"reft: compiled {plan.name} in {time.time() - t0:.1f}s")
        return plan

    def bench(self, plan: Path, p: int, n: int, reps: int, threads: int) -> list[dict]:
        cmd = self.reft + ["bench", str(plan), "-p", str(p), "-n", str(n), "-r", str(reps), "--threads", str(threads),
                           "--output", "json"]
        say(f"reft: {shlex.join(cmd)}")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"reft bench timed out after {self.timeout:.0f}s") from None
        if r.returncode != 0:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise BenchError(f"reft bench failed (exit {r.returncode}): {last[0]}")
        recs = parse_reft_json(r.stdout)
        for rec in recs:
            if rec.get("threads") not in (None, threads):
                say(f"reft: warning: record {rec.get('test')} says threads={rec.get('threads')}, asked for {threads}")
        return recs


def parse_reft_json(text: str) -> list[dict]:
    """The JSON list `reft bench --output json` prints (tolerates log lines around it)."""
    text = text.strip()
    cands = [text] + [text[i:] for i in range(len(text)) if text[i] == "[" and (i == 0 or text[i - 1] == "\n")]
    for c in cands:
        try:
            obj, _ = json.JSONDecoder().raw_decode(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            obj = [obj]
        if isinstance(obj, list) and all(isinstance(o, dict) for o in obj):
            bad = [o for o in obj if not all(k in o for k in REFT_KEYS)]
            if bad:
                raise BenchError(f"reft bench JSON record lacks {REFT_KEYS}: {json.dumps(bad[0])[:200]}")
            return obj
    snippet = text[:160].replace("\n", " ")
    raise BenchError(f"reft bench did not print a JSON list of records (got: {snippet!r})")


# ----------------------------------------------------------------------------- the run

def check_inputs(args) -> list[tuple[str, str, Path, Path]]:
    """(model, format, hf_dir, gguf) for every requested pair; one clear error if anything is missing."""
    out = []
    for model in args.models:
        d = args.models_dir / model
        for fmt in args.formats:
            hf, gg = d / "hf", d / f"{fmt}.gguf"
            hint = f"create it with: python tools/bench_models.py --out {args.models_dir} --models {model}"
            if not args.llamacpp_only and FORMATS[fmt] is None and not gg.is_file():
                raise BenchError(f"model {model}: {gg} not found (reft compiles the GGUF file for {fmt})")
            if not args.llamacpp_only and FORMATS[fmt] is not None and not (hf / "config.json").is_file():
                raise BenchError(f"model {model}: {hf}/config.json not found; {hint}")
            if not args.reft_only and not gg.is_file():
                raise BenchError(f"model {model}: {gg} not found; {hint}")
            out.append((model, fmt, hf, gg))
    return out


def run(args) -> dict:
    pairs = check_inputs(args)
    use_llama, use_reft = not args.reft_only, not args.llamacpp_only
    if use_llama:
        lc.lib()  # raises LlamaCppError with the install hint
    reft = None
    if use_reft:
        reft = Reft(args.reft, args.reftc, args.backend, args.plans_dir, args.recompile, args.compile_arg,
                    args.reft_timeout, args.target)
        reft.preflight()

    la = loadavg()
    meta = dict(date=dt.datetime.now().isoformat(timespec="seconds"), host=platform.node(), cpu=cpu_name(),
                cores=os.cpu_count(), host_simd=host_simd(), reft_target=args.target or host_simd(),
                loadavg_at_start=la, n_prompt=args.n_prompt, n_gen=args.n_gen,
                reps=args.reps, rounds=args.rounds, n_batch=args.batch, n_ctx=max(args.n_ctx, args.n_prompt + args.n_gen),
                bandwidth_gbps=args.bandwidth, reft_backend=args.backend if use_reft else None,
                reft_commit=git_rev(HERE.parent) if use_reft else None)
    if use_llama:
        meta.update(llamacpp=lc.version(), llamacpp_system_info=lc.system_info(), flash_attn=args.flash_attn)
    if la == la and la > 0.5:
        say(f"warning: 1-minute load average is {la:.2f}: other work is running, timings will be noisy")

    tests = [(f"pp{args.n_prompt}", args.n_prompt, 0), (f"tg{args.n_gen}", 0, args.n_gen)]
    results, errors = [], []
    fa = {"auto": -1, "off": 0, "on": 1}[args.flash_attn]
    try:
        for model, fmt, hf_dir, gguf_path in pairs:
            lm = plan = None
            try:
                if use_llama:
                    lm = lc.Model(gguf_path)
                    say(f"llama.cpp: loaded {gguf_path} ({lm.desc}, {lm.size_bytes / 1e6:.1f} MB, {lm.n_params:,} params)")
                if use_reft:
                    plan = reft.plan(model, fmt, hf_dir, gguf_path)
            except (BenchError, lc.LlamaCppError) as e:
                errors.append(f"{model} {fmt}: {e}")
                say(f"error: {model} {fmt}: {e}")
                if lm:
                    lm.close()
                continue
            for threads in args.threads:
                rows = {name: dict(model=model, format=fmt, threads=threads, test=name, llamacpp_runs=[], reft_runs=[],
                                   reft_records=[]) for name, _, _ in tests}
                ctx = None
                try:
                    if lm:
                        ctx = lm.context(n_ctx=meta["n_ctx"], n_batch=args.batch, n_ubatch=args.ubatch,
                                         n_threads=threads, flash_attn=fa)
                    for rnd in range(args.rounds):
                        order = ["llama.cpp", "reft"] if rnd % 2 == 0 else ["reft", "llama.cpp"]
                        for eng in order:
                            if eng == "llama.cpp" and ctx:
                                for name, np_, ng in tests:
                                    runs = lc.bench(ctx, n_prompt=np_, n_gen=ng, reps=args.reps, seed=1234 + rnd)
                                    rows[name]["llamacpp_runs"] += runs
                                    m, s = mean_std(runs)
                                    say(f"llama.cpp: {model} {fmt} {threads}T {name} round {rnd + 1}/{args.rounds}: "
                                        f"{m:.2f} ± {s:.2f} t/s  (load {loadavg():.2f})")
                            elif eng == "reft" and plan:
                                recs = reft.bench(plan, args.n_prompt, args.n_gen, args.reps, threads)
                                by_test = {r["test"]: r for r in recs}
                                for name, _, _ in tests:
                                    rec = by_test.get(name)
                                    if rec is None:
                                        raise BenchError(f"reft bench printed no '{name}' record "
                                                         f"(got {sorted(by_test)})")
                                    rows[name]["reft_runs"] += [float(x) for x in rec.get("runs") or
                                                                [rec["tokens_per_s"]]]
                                    rows[name]["reft_records"].append(rec)
                                    say(f"reft:      {model} {fmt} {threads}T {name} round {rnd + 1}/{args.rounds}: "
                                        f"{rec['tokens_per_s']:.2f} ± {rec.get('stddev', 0.0):.2f} t/s")
                except (BenchError, lc.LlamaCppError) as e:
                    errors.append(f"{model} {fmt} {threads}T: {e}")
                    say(f"error: {model} {fmt} {threads}T: {e}")
                finally:
                    if ctx:
                        ctx.close()
                for name, _, _ in tests:
                    results.append(summarize(rows[name], lm, args))
            if lm:
                lm.close()
    except KeyboardInterrupt:
        errors.append("interrupted")
        say("interrupted: reporting what was measured")
    return dict(meta=meta, results=results, errors=errors)


def summarize(row: dict, lm, args) -> dict:
    lm_m, lm_s = mean_std(row["llamacpp_runs"])
    rf_m, rf_s = mean_std(row["reft_runs"])
    recs = row.pop("reft_records")
    size = lm.size_bytes if lm else next((r.get("size_bytes") for r in recs if r.get("size_bytes")), None)
    bw = bandwidth_for(args.bandwidth, row["threads"])
    out = dict(row, weight_bytes=size, bandwidth_gbps=bw,
               llamacpp_tokens_per_s=lm_m if row["llamacpp_runs"] else None,
               llamacpp_stddev=lm_s if row["llamacpp_runs"] else None,
               reft_tokens_per_s=rf_m if row["reft_runs"] else None,
               reft_stddev=rf_s if row["reft_runs"] else None)
    if lm:
        out.update(llamacpp_params=lm.n_params, llamacpp_desc=lm.desc)
    if recs:
        out.update(reft_peak_rss_bytes=max((r.get("peak_rss_bytes") or 0) for r in recs) or None,
                   reft_size_bytes=recs[-1].get("size_bytes"), reft_params=recs[-1].get("params"),
                   reft_backend=recs[-1].get("backend"))
    out["ratio"] = (rf_m / lm_m) if (row["llamacpp_runs"] and row["reft_runs"] and lm_m > 0) else None
    if row["test"].startswith("tg") and size:
        limit = bw * 1e9 / size
        out["bw_limit_tokens_per_s"] = limit
        out["llamacpp_bw_fraction"] = lm_m / limit if row["llamacpp_runs"] else None
        out["reft_bw_fraction"] = rf_m / limit if row["reft_runs"] else None
    return out


# ----------------------------------------------------------------------------- output

LLAMA_SIMD = ("AVX", "AVX2", "F16C", "FMA", "AVX512", "AVX512_VNNI", "AVX_VNNI", "NEON", "ARM_FMA", "DOTPROD")


def fmt_ts(m, s) -> str:
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "—"
    return f"{m:.2f} ± {s:.2f}"


def pct(x) -> str:
    return "—" if x is None else f"{x:.0%}"


def markdown(report: dict) -> str:
    meta = report["meta"]
    simd = f"host SIMD {meta.get('host_simd', '?')}, reft target {meta.get('reft_target', '?')}"
    if meta.get("llamacpp_system_info"):
        feats = [f.split(" = ")[0].strip() for f in meta["llamacpp_system_info"].split("|")
                 if f.strip().endswith("= 1") and f.split(" = ")[0].strip() in LLAMA_SIMD]
        simd += f", llama.cpp built with {'+'.join(feats) or 'no SIMD flags'}"
    lines = [f"reft vs llama.cpp — {meta['date']}, {meta['cpu']} ({meta['cores']} cores, {simd}), "
             f"p={meta['n_prompt']} n={meta['n_gen']}, {meta['rounds']} round(s) × {meta['reps']} reps per engine, "
             f"load avg at start {meta['loadavg_at_start']:.2f}",
             "",
             "| model | format | threads | test | llama.cpp t/s | reft t/s | reft/llama.cpp | tg limit t/s (GB/s) "
             "| llama.cpp % of limit | reft % of limit |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        limit = (f"{r['bw_limit_tokens_per_s']:.1f} ({r['bandwidth_gbps']:g})"
                 if r.get("bw_limit_tokens_per_s") else "")
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        lines.append(f"| {r['model']} | {r['format']} | {r['threads']} | {r['test']} | "
                     f"{fmt_ts(r['llamacpp_tokens_per_s'], r['llamacpp_stddev'])} | "
                     f"{fmt_ts(r['reft_tokens_per_s'], r['reft_stddev'])} | {ratio} | {limit} | "
                     f"{pct(r.get('llamacpp_bw_fraction')) if limit else ''} | "
                     f"{pct(r.get('reft_bw_fraction')) if limit else ''} |")
    if report["errors"]:
        lines += ["", "Errors:"] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Benchmark reft's CPU backend against llama.cpp (llama-cpp-python) on the same weights, "
                    "precision and thread count, alternating the engines in one run; prints a markdown table "
                    "(or JSON) of pp/tg tokens/s, reft/llama.cpp ratios and the decode bandwidth limit.",
        epilog="Examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                   help=f"output of tools/bench_models.py (default {DEFAULT_MODELS_DIR})")
    g.add_argument("--models", nargs="+", default=list(MODELS), metavar="MODEL",
                   help=f"model folders under --models-dir (default: {' '.join(MODELS)})")
    g.add_argument("--formats", nargs="+", choices=list(FORMATS), default=["f32", "f16"],
                   help="weight precisions (default: f32 f16); quantized ones read <format>.gguf on both engines")
    g.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts (default: 1 2)")
    g.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens of the pp test (default 512)")
    g.add_argument("-n", "--n-gen", type=int, default=128, help="decode steps of the tg test (default 128)")
    g.add_argument("-r", "--reps", type=int, default=3, help="repetitions per engine per round (default 3)")
    g.add_argument("--rounds", type=int, default=2,
                   help="alternations of the two engines; all repetitions are pooled (default 2)")
    g.add_argument("--llamacpp-only", action="store_true", help="measure llama.cpp only")
    g.add_argument("--reft-only", action="store_true", help="measure reft only")
    g = p.add_argument_group("reft")
    g.add_argument("--reft", type=shlex.split, default=["reft"], help="reft command (default: reft)")
    g.add_argument("--reftc", type=shlex.split, default=["reftc"], help="reftc command (default: reftc)")
    g.add_argument("--backend", default="cpu", help="reftc compile --backend (default: cpu)")
    g.add_argument("--target", default=None, choices=("avx512", "avx2", "neon", "generic"),
                   help="reftc compile --target: the cpu instruction set of reft's kernels (default: the host's best)")
    g.add_argument("--plans-dir", type=Path, default=DEFAULT_PLANS_DIR,
                   help=f"where compiled plans go: <model>-<format>-<backend> (default {DEFAULT_PLANS_DIR})")
    g.add_argument("--recompile", action="store_true", help="recompile plans that already exist")
    g.add_argument("--compile-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for reftc compile (repeatable), e.g. --compile-arg=--page-size=32")
    g.add_argument("--reft-timeout", type=float, default=3600, help="seconds per reft subprocess (default 3600)")
    g = p.add_argument_group("llama.cpp")
    g.add_argument("--batch", type=int, default=512, help="n_batch (default 512)")
    g.add_argument("--ubatch", type=int, default=512, help="n_ubatch (default 512, llama-bench's)")
    g.add_argument("--n-ctx", type=int, default=640, help="context size, at least p+n (default 640)")
    g.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                   help="flash attention (default auto, llama-bench's)")
    g = p.add_argument_group("report")
    g.add_argument("--bandwidth", nargs="+", default=["1=25", "2=40"], metavar="THREADS=GBPS",
                   help="memory bandwidth per thread count for the decode limit (default: 1=25 2=40, PERF-NOTES); "
                        "thread counts not listed use the nearest smaller one")
    g.add_argument("--output", choices=("md", "json"), default="md", help="stdout format (default md)")
    g.add_argument("--save", type=Path, default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    try:
        args.bandwidth = parse_bandwidth(args.bandwidth)
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.llamacpp_only and args.reft_only:
        p.error("--llamacpp-only and --reft-only exclude each other")
    if min(args.threads) < 1 or args.reps < 1 or args.rounds < 1 or args.n_prompt < 1 or args.n_gen < 1:
        p.error("threads, reps, rounds, -p and -n must be positive")
    if args.n_prompt > args.batch:
        p.error(f"-p {args.n_prompt} > --batch {args.batch}: pp must be one batch (raise --batch)")

    try:
        report = run(args)
    except (BenchError, lc.LlamaCppError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=1) if args.output == "json" else markdown(report)
    print(text)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(report, indent=1) + "\n")
        say(f"saved {args.save}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
