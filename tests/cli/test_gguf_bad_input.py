"""Bad .gguf input to `reftc compile`: one `error:` line naming the problem, exit 1, no plan left."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from gguf_util import copy_gguf
from paths import SHARED_MODELS
from test_bad_input import assert_one_error, no_leftovers, run

GGUF = SHARED_MODELS / "stories260K" / "stories260K.gguf"
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason="shared/models/stories260K is absent")


def compile_fails(model, tmp_path, *needles):
    out = tmp_path / "plan"
    p = run("reftc", "compile", model, "-o", out)
    assert p.returncode == 1
    assert_one_error(p, *needles)
    no_leftovers(out)


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.01])
def test_truncated(tmp_path, keep):
    data = GGUF.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:int(len(data) * keep)])
    compile_fails(bad, tmp_path, "cut.gguf", "truncated GGUF")


def test_bad_magic(tmp_path):
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGJT" + GGUF.read_bytes()[4:])
    compile_fails(bad, tmp_path, "magic.gguf", "not a GGUF file")


def test_unsupported_tensor_type(tmp_path):
    q2k = np.zeros((64, 84), np.uint8)  # 64 rows of one Q2_K block
    bad = copy_gguf(GGUF, tmp_path / "q2k.gguf", drop_tensors={"blk.0.attn_q.weight"},
                    add_tensors=[("blk.0.attn_q.weight", q2k, GGMLQuantizationType.Q2_K)])
    compile_fails(bad, tmp_path, "blk.0.attn_q.weight", "unsupported type Q2_K")


def test_unknown_architecture(tmp_path):
    bad = copy_gguf(GGUF, tmp_path / "arch.gguf", arch="gpt2")
    compile_fails(bad, tmp_path, "GGUF architecture 'gpt2' is not supported", "llama")


def test_missing_hyper_parameters(tmp_path):
    bad = copy_gguf(GGUF, tmp_path / "hp.gguf", drop_kv={"llama.block_count"})
    compile_fails(bad, tmp_path, "llama.block_count")


def test_unsupported_tokenizer(tmp_path):
    bad = copy_gguf(GGUF, tmp_path / "tok.gguf", set_kv={"tokenizer.ggml.model": ("bert", GGUFValueType.STRING)})
    compile_fails(bad, tmp_path, "tokenizer model 'bert' is not supported")


def test_shapes_disagree_with_metadata(tmp_path):
    bad = copy_gguf(GGUF, tmp_path / "ffn.gguf", set_kv={"llama.feed_forward_length": (128, GGUFValueType.UINT32)})
    compile_fails(bad, tmp_path, "shape", "mlp")


def test_other_files_are_refused(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 64)
    compile_fails(f, tmp_path, "model.bin", ".gguf file")
