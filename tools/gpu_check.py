#!/usr/bin/env python3
"""Check reft's cuda backend on a machine with an NVIDIA GPU, in one command, and record the results.

    python tools/gpu_check.py [--report docs/gpu-validation.md] [--out DIR] [--commit SHA] [--budget 450]

Stages, each in a child process with its own time limit (a hang or a driver crash in one cannot eat
the machine's lease or stop the others from being reported):

  device     name, driver, compute capability, memory, through reft's driver wrapper
  bandwidth  a 16-byte-per-thread copy kernel, compiled by NVRTC and launched through reft's driver
             wrapper over two 2 GiB buffers, timed with events: (bytes read + written) / time
  model      a Llama-3.2-1B-shaped random bf16 model (hidden 2048, 16 layers, 32 heads, 8 KV heads,
             head_dim 64, intermediate 8192, vocab 128256, tied embeddings), built with transformers
             and torch on the CPU, compiled by `reftc compile --backend cuda --dtype bfloat16`
  bench      `reft bench -p 512 -n 128` (pp512, tg128), and a batch-16 decode through the Engine
             (`reft bench` has no batch flag): 16 sequences of a 32-token prompt decoded together
  tests      `pytest -m gpu` (every gpu-marked test), with what time is left
  bound      tg128's limit: measured bandwidth / bytes per token (the weights once, plus the mean KV
             read over the 128 steps), and tg128 as a fraction of it (the issue's bar: >= 75%)

A section with the device, driver, date, commit and results (and the tail of any stage that failed)
is appended to the report; --out also gets results.json, logs.txt and a copy of the report. Without
a GPU it prints one line and exits 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

L1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
           num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
           rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
BATCH, BATCH_PROMPT, BATCH_STEPS = 16, 32, 64
COPY_BYTES = 2 << 30

COPY_SOURCE = r"""
extern "C" __global__ void copy16(void* src_, void* dst_, long long n) {
    const int4* src = (const int4*)src_;
    int4* dst = (int4*)dst_;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) dst[i] = src[i];
}
"""


# -- stages (each runs in a child: `gpu_check.py --stage NAME ARGS_JSON`, last line `RESULT <json>`) --
def stage_device(_: dict) -> dict:
    from reft.backends.cuda import arch as archs
    from reft.backends.cuda.driver import open_device

    d = open_device("tools/gpu_check.py needs an NVIDIA GPU")
    try:
        cc = d.compute_capability()
        v = d.driver_version()
        smi = shutil.which("nvidia-smi")
        driver = None
        if smi:
            r = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30)
            driver = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
        return {"name": d.name(), "cc": f"{cc[0]}.{cc[1]}", "arch": archs.from_cc(*cc),
                "driver": driver, "cuda": f"{v // 1000}.{v % 1000 // 10}", "memory": d.mem_info()[1],
                "sms": d.attribute("CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT")}
    finally:
        d.close()


def stage_bandwidth(a: dict) -> dict:
    from reft.backends.cuda import toolchain
    from reft.backends.cuda.driver import open_device
    from reft.backends.cuda.runtime import Params

    d = open_device("tools/gpu_check.py needs an NVIDIA GPU")
    try:
        cubin = toolchain.nvrtc_compile(COPY_SOURCE, "copy16", a["arch"], toolchain.flags_for(a["arch"]))[0]
        func = d.function(d.load_module(cubin), "copy16")
        nbytes = min(COPY_BYTES, d.mem_info()[0] // 4) // 16 * 16
        src, dst = d.alloc(nbytes), d.alloc(nbytes)
        d.memset(src, 0x5A, nbytes)
        params = Params(["ptr", "ptr", "i64"], [src, dst, nbytes // 16])
        grid = (d.attribute("CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT") * 8, 1, 1)
        for _ in range(3):
            d.launch(func, grid, (256, 1, 1), 0, params.address, "copy16")
        start, end = d.event(), d.event()
        iters = 20
        d.record(start)
        for _ in range(iters):
            d.launch(func, grid, (256, 1, 1), 0, params.address, "copy16")
        d.record(end)
        ms = d.elapsed_ms(start, end)
        d.synchronize()
        return {"bytes": nbytes, "bandwidth": 2 * nbytes * iters / (ms / 1e3)}
    finally:
        d.close()


def stage_model(a: dict) -> dict:
    import torch
    import transformers

    out = Path(a["dir"])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    cfg = transformers.LlamaConfig(**L1B)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok = ROOT / "reft" / "assets" / "stories260K"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, out / f)
    params = {id(p): p for p in model.parameters()}     # tied weights once
    return {"params": sum(p.numel() for p in params.values()),
            "param_bytes": sum(p.numel() * p.element_size() for p in params.values())}


def stage_batch(a: dict) -> dict:
    import numpy as np

    from reft.runtime.engine import Chunk, Engine

    page = 16
    engine = Engine.load(a["plan"], kv_tokens=BATCH * (BATCH_PROMPT + BATCH_STEPS + 16 + 2 * page))
    rng = np.random.default_rng(0)
    vocab = int(engine.plan.manifest.get("vocab_size") or 32000)
    seqs = [engine.new_sequence(rng.integers(3, vocab, BATCH_PROMPT).tolist()) for _ in range(BATCH)]
    engine.step([Chunk(s, BATCH_PROMPT) for s in seqs])

    def decode(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            for s in seqs:
                s.tokens.append(int(rng.integers(3, vocab)))
            engine.step([Chunk(s, 1) for s in seqs])
        return time.perf_counter() - t0

    decode(8)   # warm-up: graph captures
    seconds = decode(BATCH_STEPS)
    return {"tokens_per_s": BATCH * BATCH_STEPS / seconds, "steps": BATCH_STEPS}


STAGES = {"device": stage_device, "bandwidth": stage_bandwidth, "model": stage_model, "batch": stage_batch}


def child_main(name: str, args: str) -> None:
    from reft.errors import ReftError

    try:
        result = STAGES[name](json.loads(args))
    except ReftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print("RESULT " + json.dumps(result), flush=True)


# -- the orchestrator -------------------------------------------------------------------------------
class Run:
    def __init__(self, budget: float, out: Path | None):
        self.deadline = time.monotonic() + budget
        self.out = out
        self.logs: dict[str, str] = {}
        self.failures: dict[str, str] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def proc(self, name: str, cmd: list[str], limit: float, quiet: bool = False) -> tuple[int | None, str, float]:
        """(exit code or None on timeout, combined output, seconds) of one child, in its own session
        so that a timeout ends it and everything it started."""
        limit = min(limit, self.left())
        if limit < 10:
            self.failures[name] = "skipped: the time budget ran out"
            return None, "", 0.0
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        try:
            text, _ = p.communicate(timeout=limit)
            code = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            text, _ = p.communicate()
            code = None
        seconds = time.monotonic() - t0
        self.logs[name] = text
        if self.out:   # one file: what comes back from a lent machine is limited in count
            with open(self.out / "logs.txt", "a") as f:
                f.write(f"===== {name} ({seconds:.0f} s, exit {code}) =====\n{text}\n")
        if not quiet:
            print(f"[gpu_check] {name}: " + ("timed out" if code is None else f"exit {code}") + f" in {seconds:.0f} s",
                  flush=True)
        if code != 0:
            tail = "\n".join(text.strip().splitlines()[-25:])
            self.failures[name] = (f"timed out after {limit:.0f} s" if code is None else f"exit {code}") + "\n" + tail
        return code, text, seconds

    def stage(self, name: str, args: dict, limit: float, quiet: bool = False) -> dict | None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", name, json.dumps(args)]
        code, text, seconds = self.proc(name, cmd, limit, quiet)
        for line in reversed(text.splitlines()):
            if line.startswith("RESULT "):
                return {**json.loads(line[7:]), "seconds": seconds}
        return None


def commit(given: str | None) -> str:
    if given:
        return given
    try:
        r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return r.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown (no git checkout here; pass --commit)"


def pytest_summary(text: str) -> str:
    for line in reversed(text.splitlines()):
        s = line.strip("= ").strip()
        if any(w in s for w in (" passed", " failed", " error", " skipped", "no tests ran")):
            return s
    return "no summary"


def section(r: dict, failures: dict, commit_id: str) -> str:
    dev = r.get("device") or {}
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rows = []
    add = lambda k, v: rows.append(f"| {k} | {v} |")  # noqa: E731
    add("device", f"{dev.get('name')}, compute capability {dev.get('cc')} ({dev.get('arch')}), {dev.get('sms')} SMs, "
                  f"{dev.get('memory', 0) / 2**30:.1f} GiB")
    add("driver", f"{dev.get('driver') or '?'} (CUDA {dev.get('cuda')})")
    bw = r.get("bandwidth")
    add("copy bandwidth", f"{bw['bandwidth'] / 1e12:.2f} TB/s (bytes read + written, 2 x {bw['bytes'] / 2**30:.2f} GiB)"
        if bw else "failed")
    m = r.get("model")
    add("model", f"Llama-3.2-1B-shaped, random bf16: {m['params'] / 1e9:.3f} B params, {m['param_bytes'] / 1e9:.3f} GB"
        if m else "failed")
    c = r.get("compile")
    add("reftc compile --backend cuda", f"{c['seconds']:.0f} s" if c else "failed")
    bench = {b["test"]: b for b in r.get("bench") or []}
    for test in ("pp512", "tg128"):
        b = bench.get(test)
        add(test, f"{b['tokens_per_s']:.1f} ± {b['stddev']:.1f} t/s" if b else "failed")
    if bench:
        add("plan load", f"{next(iter(bench.values()))['load_s']:.2f} s")
    bt = r.get("batch")
    add(f"batch-{BATCH} decode", f"{bt['tokens_per_s']:.1f} t/s ({BATCH} sequences, {bt['steps']} steps after a "
                                 f"{BATCH_PROMPT}-token prompt)" if bt else "failed")
    bound = r.get("bound")
    if bound:
        add("tg128 bound", f"{bound['tokens_per_s']:.1f} t/s = {bound['bandwidth'] / 1e12:.2f} TB/s / "
                           f"{bound['bytes_per_token'] / 1e9:.3f} GB per token")
        if "fraction" in bound:
            add("tg128 / bound", f"{100 * bound['fraction']:.1f}% (the bar: >= 75%)")
    add("gpu tests (pytest -m gpu)", r.get("tests") or "failed")
    out = [f"\n## {now}: {dev.get('name')}, commit {commit_id}\n", "| check | result |", "|---|---|", *rows]
    if failures:
        out.append("\nFailed stages (the last lines of each):\n")
        for name, text in failures.items():
            out += [f"<details><summary>{name}: {text.splitlines()[0]}</summary>\n", "```",
                    *text.splitlines()[1:], "```", "</details>\n"]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "gpu-validation.md")
    ap.add_argument("--out", type=Path, default=None,
                    help="also write results.json, logs.txt (every stage's output) and the report here")
    ap.add_argument("--commit", default=None, help="the commit under test, where this tree has no .git")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything (default 450)")
    ap.add_argument("--work", type=Path, default=None, help="where the model and plan go [a temporary folder]")
    args = ap.parse_args()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.budget, args.out)
    r: dict = {}
    r["device"] = run.stage("device", {}, 60, quiet=True)
    if r["device"] is None or not r["device"].get("arch"):
        line = (run.logs.get("device") or "").strip().splitlines()
        print(line[-1] if line else "error: no NVIDIA GPU found", file=sys.stderr)
        return 1
    arch = r["device"]["arch"]
    work = args.work or Path(tempfile.mkdtemp(prefix="reft-gpu-check-"))
    model, plan = work / "llama-1b", work / "llama-1b-cuda"
    r["bandwidth"] = run.stage("bandwidth", {"arch": arch}, 90)
    r["model"] = run.stage("model", {"dir": str(model)}, 150)
    if r["model"]:
        code, _, seconds = run.proc("compile", [sys.executable, "-m", "reft.cli.reftc", "compile", str(model), "-o",
                                                str(plan), "--backend", "cuda", "--dtype", "bfloat16"], 300)
        r["compile"] = {"seconds": seconds} if code == 0 else None
    if r.get("compile"):
        code, text, _ = run.proc("bench", [sys.executable, "-m", "reft.cli.reft", "bench", str(plan), "-p", "512",
                                           "-n", "128", "-r", "3", "-o", "json"], 180)
        start, end = text.find("[\n  {"), text.rfind("\n]")
        if code == 0 and 0 <= start < end:   # the JSON list, whatever else was printed around it
            r["bench"] = json.loads(text[start:end + 2])
        r["batch"] = run.stage("batch", {"plan": str(plan)}, 120)
    # a test module whose imports fail here (a server test's client, say) must not stop the gpu tests
    code, text, seconds = run.proc("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p",
                                             "no:cacheprovider", "--continue-on-collection-errors", "tests"],
                                   max(60.0, run.left() - 5))
    r["tests"] = f"{pytest_summary(text)} ({seconds:.0f} s)" if text else None
    if r.get("bandwidth") and r.get("model"):
        cfg = L1B
        kv_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
        per_token = r["model"]["param_bytes"] + kv_token * 128 / 2      # mean context over tg128
        bound = {"bandwidth": r["bandwidth"]["bandwidth"], "bytes_per_token": per_token,
                 "tokens_per_s": r["bandwidth"]["bandwidth"] / per_token}
        tg = next((b for b in r.get("bench") or [] if b["test"] == "tg128"), None)
        if tg:
            bound["fraction"] = tg["tokens_per_s"] / bound["tokens_per_s"]
        r["bound"] = bound
    text = section(r, run.failures, commit(args.commit))
    print(text)
    if not args.report.exists():
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text("# GPU validation\n")
    with open(args.report, "a") as f:
        f.write(text)
    if args.out:
        (args.out / "results.json").write_text(json.dumps({"results": r, "failures": run.failures}, indent=2))
        shutil.copy(args.report, args.out / args.report.name)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not run.failures else 2


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--stage":
        child_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
