"""The neon (aarch64) cpu kernels against the numpy reference: cross-compiled with Debian's
g++-aarch64-linux-gnu into one executable per graph (templates/driver.cpp), run under qemu-user
(reft.backends.cpu.emulate). Every op, dense matmuls at every decode-batch token count and the
GEMM path, the quantized kernels, and batch invariance.

Emulation is slow, so each example packs many cases into one graph (one compile, one run) and
examples are few; shrinking is off (a failure names its output, case and op). Skips without the
cross compiler or qemu, unless REFT_REQUIRE_CROSS=1 (CI sets it, so CI cannot skip silently).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from strategies import AWAITING_CPU_KERNELS, OP_CASES, matmul_cases
from test_cpu_ops import as_f32, build, check_against_reference, check_rows_do_not_depend_on_the_batch, uses_uint8
from test_cpu_quant import build as build_quantized, check_reproducible_rows, check_step

from reft.backends.cpu.emulate import available, compile_graph_cross
from reft.backends.cpu.lower import PACKED_READERS, Unsupported, lower
from reft.backends.cpu.targets import get as get_target
from reft.ir.types import np_dtype

TARGET = "neon"
GEMV_MAX_T = get_target(TARGET).tuning["GEMV_MAX_T"]
FEW = settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def cross_tools():
    if not available(TARGET):
        why = "needs g++-aarch64-linux-gnu and qemu-user (apt-get install g++-aarch64-linux-gnu qemu-user)"
        if os.environ.get("REFT_REQUIRE_CROSS") == "1":
            pytest.fail(f"REFT_REQUIRE_CROSS=1 but cpu target {TARGET} cannot run here: {why}")
        pytest.skip(why)


def lowers(case) -> bool:
    """Whether the cpu backend takes the case (test_cpu_ops rejects an example that holds one it
    does not; here one unsupported case would waste a whole example of every op)."""
    try:
        lower(build([case])[0], 80, TARGET)
    except Unsupported:
        return False
    return True


@FEW
@given(data=st.data())
def test_neon_ops_match_reference(data):
    """Two cases of every op in one graph."""
    cases = [data.draw(OP_CASES[op]) for op in sorted(set(OP_CASES) - AWAITING_CPU_KERNELS) for _ in range(2)]
    cases = [(o, as_f32(o, xs), a) for o, xs, a in cases if not uses_uint8(xs, a)]   # no uint8 kernels
    check_against_reference([c for c in cases if lowers(c)], target=TARGET, compile=compile_graph_cross)


# every token count of the GEMV and its tiles (with their remainders), and the GEMM above it
TOKENS = [*range(1, 18), GEMV_MAX_T, GEMV_MAX_T + 1]


@pytest.mark.parametrize("wdtype", ["float32", "float16", "bfloat16"])
@settings(FEW, max_examples=2)
@given(data=st.data())
def test_neon_matmuls_at_every_batch_size(wdtype, data):
    """linear, linear_glu and qkv_rope with `wdtype` weights at each token count in one graph."""
    cases = []
    for T in TOKENS:
        for op, strategy in matmul_cases(st.just(T)).items():
            o, xs, a = data.draw(strategy)
            w = PACKED_READERS[o]
            xs[w] = xs[w].astype(np.float32).astype(np_dtype(wdtype))
            cases.append((o, as_f32(o, xs), a))
    check_against_reference(cases, target=TARGET, compile=compile_graph_cross)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    graph, weights, xs = build_quantized()
    exe = compile_graph_cross(graph, weights, tmp_path_factory.mktemp("quant"), target=TARGET, max_tokens=32)
    return graph, weights, xs, exe


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 7, 16, 17])   # GEMV (groups of up to 4 tokens), dequantize + GEMM
def test_neon_quantized_kernels_match_reference(quantized, T):
    """Every quantized weight dtype (q8_0 ... q6_k, int8, int4_g*): linear, linear_glu, qkv_rope, embedding."""
    check_step(*quantized, T, seed=T)


def test_neon_quantized_rows_do_not_depend_on_the_batch_in_reproducible_mode(quantized):
    check_reproducible_rows(*quantized)


@pytest.mark.parametrize("reproducible", [False, True], ids=["fast", "reproducible"])
@pytest.mark.parametrize("wdtype", ["float32", "float16", "bfloat16"])
def test_neon_linear_rows_do_not_depend_on_the_batch(wdtype, reproducible):
    check_rows_do_not_depend_on_the_batch(wdtype, TARGET, compile=compile_graph_cross, reproducible=reproducible)
