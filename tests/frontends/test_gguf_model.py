"""stories260K.gguf (llama.cpp's file) compiles to the plan its Hugging Face folder compiles to.

Oracles: shared/models/stories260K/reference_outputs.json (transformers' greedy ids), the HF
folder beside the .gguf (same weights in HF layout: checks the q/k row un-permutation), and the
`gguf` package's own dequantizer for re-quantized copies of the file.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf_util import copy_gguf
from paths import SHARED_MODELS

from reft.compiler import compile_model
from reft.frontends.config import load_hf_config
from reft.frontends.gguf import open_gguf, unpermute_rope_rows
from reft.frontends.safetensors import open_weights
from reft.runtime.engine import Engine
from reft.runtime.generate import GenerationRequest, generate
from reft.runtime.sampler import SamplingParams

STORIES = SHARED_MODELS / "stories260K"
GGUF = STORIES / "stories260K.gguf"
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason="shared/models/stories260K is absent")


@pytest.fixture(scope="module")
def reference():
    return json.loads((STORIES / "reference_outputs.json").read_text())


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """(gguf plan, hf plan) per backend, compiled lazily."""
    root, cache = tmp_path_factory.mktemp("gguf_plans"), {}

    def get(source: str, backend: str):
        if (source, backend) not in cache:
            model = GGUF if source == "gguf" else STORIES / "hf"
            cache[source, backend] = compile_model(model, root / f"{source}-{backend}", backend=backend,
                                                   progress=False)
        return cache[source, backend]
    return get


def test_config_and_weights_equal_the_hf_folder():
    g = open_gguf(GGUF)
    family = g.family
    assert family.Config.from_hf(g.hf_config) == family.Config.from_hf(load_hf_config(STORIES / "hf"))
    hf = open_weights(STORIES / "hf")
    assert set(g.weights) == set(hf)
    for name in hf:
        assert g.weights.info(name) == hf.info(name), name
        assert np.array_equal(g.weights[name], hf[name]), name  # q/k rows back in HF order
    assert g.source_types == {"F32": 48}


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter groups each head's rows as (half, pair index); ours must undo exactly that."""
    rng = np.random.default_rng(0)
    heads, d, cols = 3, 8, 5
    w = rng.standard_normal((heads * d, cols))
    permuted = w.reshape(heads, 2, d // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(unpermute_rope_rows(permuted, heads), w)
    assert not np.array_equal(permuted, w)


def test_greedy_ids_match_reference(plans, reference):
    engine = Engine.load(plans("gguf", "cpu"))
    assert engine.tokenizer.encode(reference["prompt"]) == reference["prompt_ids"]
    req = GenerationRequest(reference["prompt_ids"], 64, SamplingParams(temperature=0.0))
    ids = list(generate(engine, req))
    assert ids == reference["greedy_64_ids"]
    assert engine.tokenizer.decode(ids) == reference["greedy_64_text"]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_same_logits_as_hf_folder_plan(plans, reference, backend):
    ids = reference["prompt_ids"] + reference["greedy_64_ids"]
    a = Engine.load(plans("gguf", backend)).logits(ids)
    b = Engine.load(plans("hf", backend)).logits(ids)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    for tok, value in reference["last_logits_top5"]:
        assert abs(Engine.load(plans("gguf", backend)).logits(reference["prompt_ids"])[-1][tok] - value) < 1e-4


def test_manifest_records_the_gguf_source(plans):
    m = json.loads((plans("gguf", "cpu") / "manifest.json").read_text())
    assert m["model"]["gguf_tensor_types"] == {"F32": 48}
    assert m["model"]["params"] == 292_800 and m["model"]["architecture"] == "LlamaForCausalLM"
    from click.testing import CliRunner

    from reft.cli.reftc import main

    shown = CliRunner().invoke(main, ["inspect", str(plans("gguf", "cpu"))])
    assert shown.exit_code == 0 and "GGUF file with 48 F32 tensors, dequantized to float32" in shown.output


def test_tied_embeddings_when_output_is_absent(tmp_path, reference):
    path = copy_gguf(GGUF, tmp_path / "tied.gguf", drop_tensors={"output.weight"})
    g = open_gguf(path)
    assert g.hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in g.weights
    plan = compile_model(path, tmp_path / "plan", backend="reference", progress=False)
    m = json.loads((plan / "manifest.json").read_text())
    assert m["model"]["params"] == 292_800 - 512 * 64
    x = Engine.load(plan).logits(reference["prompt_ids"])
    assert x.shape == (len(reference["prompt_ids"]), 512) and np.isfinite(x).all()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"])
def test_quantized_copy_reads_as_gguf_dequantizes(tmp_path, reference, qtype):
    """Every matrix whose rows are whole blocks re-quantized by the gguf package; reft's weights equal
    the package's dequantization (after the q/k un-permutation) and the plan still predicts well."""
    t = GGMLQuantizationType[qtype]
    src = GGUFReader(str(GGUF))
    names = {x.name for x in src.tensors if len(x.shape) == 2 and x.shape[0] % 32 == 0}
    path = copy_gguf(GGUF, tmp_path / f"{qtype}.gguf", retype=dict.fromkeys(names, t))
    g = open_gguf(path)
    ref = {x.name: gguf_dequantize(np.asarray(x.data), x.tensor_type) for x in GGUFReader(str(path)).tensors}
    inverse = {v.format(i=i): k.format(i=i) for k, v in g.family.GGUF_TENSORS.items() for i in range(5)}
    for name in g.weights:
        want = ref[inverse[name]].astype(np.float32).reshape(g.weights.info(name)[1])
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            want = unpermute_rope_rows(want, 8 if "q_proj" in name else 4)
        assert np.array_equal(g.weights[name].astype(np.float32), want), name
    assert sum(g.source_types.values()) == 48 and g.source_types.get(qtype, 0) == len(names)
    ids = reference["prompt_ids"] + reference["greedy_64_ids"][:16]
    x = Engine.load(compile_model(path, tmp_path / "plan", backend="reference", progress=False)).logits(ids)
    hits = np.mean(np.argmax(x[len(reference["prompt_ids"]) - 1:-1], -1) == reference["greedy_64_ids"][:16])
    assert hits >= 0.75


def test_llama3_rope_freqs_tensor_compiles_like_the_hf_rope_scaling(tmp_path, reference):
    """A GGUF carrying Llama 3 rope scaling as per-frequency factors (rope_freqs.weight, as
    convert_hf_to_gguf.py writes it) gives the logits of the HF folder with that rope_scaling.
    The factors come from transformers' own llama3 rope initialisation."""
    import shutil

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    # stories260K: head_dim 8, so 4 frequencies; these thresholds put two of them in the smooth band
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 64.0,
               "original_max_position_embeddings": 1024}
    hf = tmp_path / "hf"
    shutil.copytree(STORIES / "hf", hf)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = scaling
    (hf / "config.json").write_text(json.dumps(cfg))
    tcfg = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](tcfg, "cpu")
    inv, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(tcfg)
    factors = (inv / inv_scaled).numpy().astype(np.float32)
    assert 1 < factors[1] < 8 and 1 < factors[2] < 8            # the smooth band is exercised

    path = copy_gguf(GGUF, tmp_path / "llama3.gguf", add_tensors=[("rope_freqs.weight", factors, None)])
    got = open_gguf(path).hf_config["rope_scaling"]
    assert got["rope_type"] == "llama3" and got["factor"] == 8.0 and got["original_max_position_embeddings"] == 1024
    ids = reference["prompt_ids"] + reference["greedy_64_ids"]
    a = Engine.load(compile_model(path, tmp_path / "gguf-plan", backend="reference", progress=False)).logits(ids)
    b = Engine.load(compile_model(hf, tmp_path / "hf-plan", backend="reference", progress=False)).logits(ids)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    plain = Engine.load(compile_model(GGUF, tmp_path / "plain", backend="reference", progress=False)).logits(ids)
    assert np.abs(plain - a).max() > 1e-3                       # the factors change the model


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    path = copy_gguf(GGUF, tmp_path / "odd.gguf",
                     add_tensors=[("rope_freqs.weight", np.array([1.0, 3.0, 1.5, 2.0], np.float32), None)])
    with pytest.raises(Exception, match="rope_freqs.weight does not follow Llama 3 rope scaling"):
        open_gguf(path)
