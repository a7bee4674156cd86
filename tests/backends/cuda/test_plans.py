"""Whole cuda plans, compiled without a GPU: every kernel of the tiny models of every family, for
sm_80 and sm_90a in bfloat16 and float16, compiles with NVRTC; ptxas's report and the SASS say
what the issue requires; the lowering binds every kernel argument; `reft run` of a cuda plan on a
machine without a driver fails with one line; `reftc inspect` lists the kernels.

Execution (parity with the reference interpreter) needs a GPU: tests/backends/cuda/test_gpu.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("cuda.bindings")

from click.testing import CliRunner  # noqa: E402

from reft.backends.cuda import arch as archs  # noqa: E402
from reft.backends.cuda import toolchain  # noqa: E402
from reft.compiler import compile_model  # noqa: E402

pytestmark = pytest.mark.skipif(not toolchain.available(), reason="NVRTC / CUDA headers not installed")

FOUR = ["llama-gqa-llama3", "mistral-window", "qwen2-bias", "qwen3-qknorm"]   # the four families
MORE = ["llama-tied-linear-legacy", "gemma2-softcap-window", "gemma3-local-global", "phi3-longrope"]
FAMILIES = FOUR + MORE
TARGETS = [("sm_80", "bfloat16"), ("sm_80", "float16"), ("sm_90a", "bfloat16"), ("sm_90a", "float16")]
# every target for the four families; the other cases (biases everywhere, Gemma, Phi-3) on one dtype
# per arch, which their kernels share with the rest (CI time)
COMBOS = [(c, a, d) for c in FOUR for a, d in TARGETS] + \
         [(c, a, d) for c in MORE for a, d in (("sm_80", "float16"), ("sm_90a", "bfloat16"))]
# kernels that must neither spill nor use a stack frame (the list: GEMM, GEMV, attention, norms)
STRICT = ("gemm", "gemv", "qgemm", "attn", "rms_norm")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from hf_tiny import make_model

    root = tmp_path_factory.mktemp("cuda_models")
    return {case: make_model(case, root / case)[0] for case in FAMILIES}


@pytest.fixture(scope="module")
def plans(models, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("cuda_plans"), {}

    def get(case: str, arch: str, dtype: str, **kw) -> Path:
        key = (case, arch, dtype, tuple(sorted(kw.items())))
        if key not in cache:
            out = root / "-".join([case, arch, dtype, *(f"{k}{v}" for k, v in sorted(kw.items()))])
            cache[key] = compile_model(models[case], out, backend="cuda", target=arch, dtype=dtype, progress=False,
                                       **kw)
        return cache[key]
    return get


def manifest(plan: Path) -> dict:
    return json.loads((plan / "manifest.json").read_text())


@pytest.mark.parametrize("case,arch,dtype", COMBOS)
def test_every_kernel_compiles_within_the_arch_limits(plans, case, arch, dtype):
    plan = plans(case, arch, dtype)
    be = manifest(plan)["backend"]
    assert be["name"] == "cuda" and be["arch"] == arch and be["dtype"] == dtype
    a = archs.get(arch)
    for name, k in be["kernels"].items():
        r = k["resources"]
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, name
        if name.startswith(STRICT):
            assert r["stack"] == 0, name
        threads = k["block"][0] * k["block"][1] * k["block"][2]
        assert r["registers"] <= a.regs_per_thread and archs.blocks_per_sm(a, threads, r["registers"],
                                                                         k["smem"] + r["smem"]) >= 1, name
        assert (plan / k["cubin"]).stat().st_size > 0 and (plan / k["source"]).read_text().startswith("//")
    kinds = {n.split("_")[0] for n in be["kernels"]}
    assert {"gemm", "gemv", "rms", "embedding", "qkv", "kv", "attn", "argmax", "sample"} <= kinds, kinds
    # device sampling over the logits rows (CudaExecutable.run_sampled)
    vocab = manifest(plan)["vocab_size"]
    assert be["sampling"] == {"entry": "forward", "output": "logits", "rows": "R", "vocab": vocab,
                              "argmax": f"argmax_v{vocab}", "sample": f"sample_v{vocab}"}


@pytest.mark.parametrize("arch,opcode", [("sm_80", "HMMA"), ("sm_90a", "HGMMA")])
def test_gemm_sass_uses_the_tensor_cores(plans, arch, opcode):
    plan = plans("llama-gqa-llama3", arch, "bfloat16")
    gemms = {n: k for n, k in manifest(plan)["backend"]["kernels"].items() if n.startswith("gemm_")}
    assert gemms
    for name, k in gemms.items():
        assert opcode in toolchain.sass_opcodes(toolchain.sass((plan / k["cubin"]).read_bytes())), name


def test_every_step_binds_every_argument(plans):
    be = manifest(plans("qwen3-qknorm", "sm_90a", "bfloat16"))["backend"]
    for entry, e in be["entries"].items():
        for s in e["steps"]:
            k = be["kernels"][s["kernel"]]
            wanted = {n for n, kind in k["args"] if kind != "tmap"}
            assert set(s["args"]) == wanted, s["kernel"]
            for name, b in s["args"].items():
                if "input" in b:
                    assert b["input"] in e["inputs"]
                if "param" in b:
                    assert b["param"] in e["params"]
                if "arena" in b:
                    assert 0 <= b["arena"] < e["arena_bytes"]


def test_token_ranges_cover_every_batch_size(plans):
    """The steps of one node that carry a `rows` range (consecutive in the step list, the first
    starting at 1) partition 1..max_batch_tokens: every batch size runs exactly one GEMV/GEMM (one
    attention variant)."""
    be = manifest(plans("mistral-window", "sm_80", "bfloat16"))["backend"]
    groups: list[list] = []
    prev = None
    for s in be["entries"]["forward"]["steps"]:
        r = s["rows"]
        if r and (prev is None or (r[1] == 1 and prev[1] != 1)):
            groups.append([])
        if r:
            groups[-1].append(s)
        prev = r
    assert len(groups) >= 2 * 5   # per layer: q/k/v, attention, o, gate/up, down
    for ss in groups:
        assert len({s["rows"][0] for s in ss}) == 1
        for t in (1, 8, 9, 16, 17, 64, 65, 512):
            hit = {tuple(s["rows"]) for s in ss if s["rows"][1] <= t <= s["rows"][2]}
            assert len(hit) == 1, (ss[0]["kernel"], t)


def test_quantized_plans_compile(plans):
    for quant in ("int8", "int4"):
        be = manifest(plans("llama-gqa-llama3", "sm_90a", "bfloat16", quant=quant))["backend"]
        names = set(be["kernels"])
        assert any(n.startswith("gemv") and quant in n for n in names), names
        assert any(n.startswith("qgemm") and quant in n for n in names), names


def test_an_unknown_arch_or_float32_weights_are_one_line_errors(models, tmp_path):
    from reft.cli.reftc import main

    r = CliRunner().invoke(main, ["compile", str(models["qwen2-bias"]), "-o", str(tmp_path / "p"),
                                  "--backend", "cuda", "--dtype", "float32"])
    assert r.exit_code != 0 and "bfloat16 or float16" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["compile", str(models["qwen2-bias"]), "-o", str(tmp_path / "p"),
                                  "--backend", "cuda", "--target", "avx2"])
    assert r.exit_code != 0 and "unknown architecture 'avx2'" in r.output
    assert not (tmp_path / "p").exists()


def test_run_without_a_driver_is_one_line(plans):
    from reft.backends.cuda.backend import local_arch
    from reft.cli.reft import main

    if local_arch() is not None:
        pytest.skip("this machine has an NVIDIA driver")
    plan = plans("qwen2-bias", "sm_90a", "bfloat16")
    r = CliRunner().invoke(main, ["run", str(plan), "--prompt", "Once upon a time", "--max-tokens", "4"])
    assert r.exit_code != 0
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "no NVIDIA driver" in lines[0], r.output


def test_inspect_lists_kernels_with_tiles_and_resources(plans):
    from reft.cli.reftc import main

    plan = plans("qwen2-bias", "sm_90a", "bfloat16")
    r = CliRunner().invoke(main, ["inspect", str(plan)])
    assert r.exit_code == 0, r.output
    be = manifest(plan)["backend"]
    assert "backend     cuda (sm_90a)" in r.output
    for name, k in be["kernels"].items():
        line = next(l for l in r.output.splitlines() if l.strip().startswith(name))
        assert str(k["resources"]["registers"]) in line.split()
        assert k["tile"][:20] in line


def test_launcher_packs_what_the_ptx_entries_declare():
    """compile_kernels checks every entry's PTX parameters against Kernel.args (ARG_KINDS' PTX types);
    the runtime packs each kind with ARG_KINDS' size, so the two agree byte for byte."""
    from reft.backends.cuda import runtime
    from reft.backends.cuda.kernel import ARG_KINDS

    ptx_bytes = {".u64": 8, ".u32": 4, ".f32": 4, ".b8[128]": 128}
    for kind, (_, ptx, size) in ARG_KINDS.items():
        assert runtime.LAYOUT[kind][1] == size == ptx_bytes[ptx], kind


def test_a_signature_mismatch_is_caught_without_a_gpu():
    import dataclasses

    from reft.backends.cuda.elementwise import add_kernel
    from reft.backends.cuda.kernel import Arg

    k = add_kernel("sm_80")
    ptx = toolchain.compile_kernels([k], "sm_80")[k.name].ptx
    toolchain.check_signature(k, ptx)
    for args in (k.args[:-1] + (Arg("n", "i64"),), k.args + (Arg("extra", "i32"),), k.args[1:]):
        with pytest.raises(toolchain.CompileError, match="the launcher packs"):
            toolchain.check_signature(dataclasses.replace(k, args=args), ptx)


# -- one plan for two devices (reftc compile --backend cpu,cuda; reft ... --device) ------------------
def _cli(tool, *args):
    from reft.cli import reft, reftc

    r = CliRunner().invoke({"reft": reft.main, "reftc": reftc.main}[tool], [str(a) for a in args])
    return r.exit_code, [line for line in r.output.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def two_devices(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("devices") / "plan"
    code, lines = _cli("reftc", "compile", models["llama-gqa-llama3"], "-o", out, "--backend", "cpu,cuda",
                       "--arch", "sm_90a", "--target", "generic")
    assert code == 0 and lines[-1] == f"wrote plan {out} (devices cpu, cuda)", lines
    return out


def test_a_plan_for_cpu_and_cuda_holds_a_whole_plan_for_each(two_devices):
    m = manifest(two_devices)
    assert m["backend"]["name"] == "cpu" and m["backend"]["target"] == "generic" and m["devices"] == {"cuda": "devices/cuda"}
    sub = manifest(two_devices / "devices" / "cuda")
    assert sub["backend"]["name"] == "cuda" and sub["backend"]["arch"] == "sm_90a" and "devices" not in sub
    assert m["dtypes"]["weights"] == "float32" and sub["dtypes"]["weights"] == "bfloat16"   # each backend's default
    code, lines = _cli("reftc", "inspect", two_devices)
    assert code == 0 and f"device      cuda (sm_90a): devices/cuda/, `reft run {two_devices} --device cuda`" in lines


def test_device_picks_the_plan_that_runs(two_devices, tmp_path):
    from reft.backends.cuda.backend import local_arch

    prompt = ["--prompt", "Once upon a time", "--max-tokens", "4", "--temperature", "0"]
    code, default = _cli("reft", "run", two_devices, *prompt)
    assert code == 0 and _cli("reft", "run", two_devices, "--device", "cpu", *prompt) == (0, default)
    if local_arch() is None:   # the cuda plan is the one loaded: no driver here
        for args in (["run", two_devices, "--device", "cuda", *prompt], ["bench", two_devices, "--device", "cuda"]):
            code, lines = _cli("reft", *args)
            assert code != 0 and len(lines) == 1 and "no NVIDIA driver" in lines[0], lines
    code, lines = _cli("reft", "run", two_devices, "--device", "reference", *prompt)
    assert code != 0 and lines == [f"error: {two_devices} was compiled for cpu and cuda, not reference; compile it"
                                   f" with `reftc compile MODEL -o {two_devices} --backend cpu,cuda,reference` to"
                                   " run it there"]


@pytest.mark.parametrize("args, needle", [
    (["--backend", "cpu,cpu"], "backend cpu is named twice"),
    (["--backend", "cpu,gpu"], "unknown backend 'gpu'"),
    (["--backend", "cpu,reference", "--arch", "sm_80"], "--arch sm_80 is for the cuda backend"),
    (["--backend", "cuda,cpu", "--arch", "sm_75"], "Invalid value for '--arch'"),
])
def test_bad_device_lists_are_one_line(models, tmp_path, args, needle):
    code, lines = _cli("reftc", "compile", models["qwen2-bias"], "-o", tmp_path / "p", *args)
    assert code != 0 and len(lines) <= 3 and needle in "\n".join(lines), lines
    assert not (tmp_path / "p").exists()


def test_a_device_that_fails_to_compile_leaves_the_old_plan(tmp_path):
    """stories260K's MLP width (172) is no multiple of 8, which the cuda GEMV needs: the cpu half
    compiles, the cuda half fails, and the plan already at -o stays as it was."""
    out = tmp_path / "plan"
    assert _cli("reftc", "compile", "stories260K", "-o", out)[0] == 0
    before = (out / "manifest.json").read_bytes()
    code, lines = _cli("reftc", "compile", "stories260K", "-o", out, "--backend", "cpu,cuda")
    assert code != 0 and lines == ["error: gemv: bfloat16 weights need K to be a positive multiple of 8, got 172"]
    assert (out / "manifest.json").read_bytes() == before and not (out / "devices").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]
