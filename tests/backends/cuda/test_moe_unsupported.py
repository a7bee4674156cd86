"""The cuda backend has no mixture-of-experts kernels yet: compiling Mixtral or Qwen3-MoE for it
fails with one line naming the first op it cannot lower, and leaves no plan behind."""
from __future__ import annotations

import pytest

pytest.importorskip("cuda.bindings")

from click.testing import CliRunner  # noqa: E402


@pytest.mark.parametrize("case", ["mixtral-moe", "qwen3-moe"])
def test_moe_plan_is_a_one_line_error(case, tmp_path):
    from hf_tiny import make_model

    from reft.cli.reftc import main

    model, _ = make_model(case, tmp_path / "hf")
    r = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "plan"), "--backend", "cuda",
                                  "--dtype", "bfloat16"])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert r.output.strip().splitlines() == ["error: cuda backend: op moe_router is not supported"]
    assert not (tmp_path / "plan").exists()
