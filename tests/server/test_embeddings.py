"""POST /v1/embeddings through the official openai client against `reft run PLAN --serve` of an
embed plan (a tiny random-weight Qwen3, cpu backend), compared with transformers' pooled hidden
states; bad requests are 4xx JSON errors naming the field, and the server keeps serving."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from hf_tiny import make_model
from server_util import Server

from reft.compiler import compile_model
from reft.runtime.plan import Plan

TEXTS = ["Once upon a time", "Lily found a needle in her room and wanted to share it with her mom.",
         "The cat sat.", "One day, a little girl named Lily went to the park with her big red ball. " * 4]


def hf_pooled(model, ids: list[int], pooling: str = "last") -> np.ndarray:
    import torch

    with torch.no_grad():
        h = model.model(torch.tensor([ids])).last_hidden_state[0].float().numpy()
    v = {"last": h[-1], "mean": h.mean(axis=0), "cls": h[0]}[pooling]
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3-embed")
    model_dir, model = make_model("qwen3-qknorm", d / "hf")
    plan = compile_model(model_dir, d / "plan", backend="cpu", task="embed", progress=False)
    return plan, model, Plan(plan).tokenizer


@pytest.fixture(scope="module")
def emb_server(qwen3, tmp_path_factory):
    """Last pooling (the default), Matryoshka dimensions allowed, 16-token steps (long inputs in chunks)."""
    s = Server(qwen3[0], tmp_path_factory.mktemp("srv"), "--model-name", "emb", "--matryoshka",
               "--max-batch-tokens", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(emb_server):
    return emb_server.client()


def vectors(resp) -> np.ndarray:
    return np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], np.float32)


def test_text_inputs_match_transformers(client, qwen3):
    _, model, tok = qwen3
    resp = client.embeddings.create(model="emb", input=TEXTS, encoding_format="float")
    got = vectors(resp)
    ids = [tok.encode(t) for t in TEXTS]
    assert got.shape == (len(TEXTS), 64) and max(map(len, ids)) > 16
    for i, g in zip(ids, got):
        assert np.abs(g - hf_pooled(model, i)).max() < 1e-4
    assert resp.model == "emb" and resp.object == "list"
    n = sum(map(len, ids))
    assert resp.usage.prompt_tokens == n and resp.usage.total_tokens == n


def test_base64_is_little_endian_float32(client):
    raw = client.embeddings.create(model="emb", input=TEXTS[:2], encoding_format="base64")
    floats = vectors(client.embeddings.create(model="emb", input=TEXTS[:2], encoding_format="float"))
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in raw.data])
    assert np.array_equal(decoded, floats)
    default = vectors(client.embeddings.create(model="emb", input=TEXTS[:2]))   # the client asks for base64
    assert np.array_equal(default, floats)


def test_token_id_inputs(client, qwen3):
    _, model, _ = qwen3
    rng = np.random.default_rng(0)
    a, b = [1] + rng.integers(3, 512, 40).tolist(), [1, 7, 9]
    one = client.embeddings.create(model="emb", input=a, encoding_format="float")
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(a)
    assert np.abs(vectors(one)[0] - hf_pooled(model, a)).max() < 1e-4
    two = vectors(client.embeddings.create(model="emb", input=[b, a], encoding_format="float"))
    assert np.abs(two[0] - hf_pooled(model, b)).max() < 1e-4
    assert np.abs(two[1] - vectors(one)[0]).max() < 1e-6


def test_dimensions_truncate_and_renormalise(client):
    full = vectors(client.embeddings.create(model="emb", input=TEXTS[1], encoding_format="float"))[0]
    short = vectors(client.embeddings.create(model="emb", input=TEXTS[1], dimensions=12, encoding_format="float"))[0]
    assert short.shape == (12,)
    assert np.abs(short - full[:12] / np.linalg.norm(full[:12])).max() < 1e-5


def test_concurrent_requests_are_all_right(client):
    want = {t: vectors(client.embeddings.create(model="emb", input=t, encoding_format="float"))[0] for t in TEXTS}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda t: vectors(client.embeddings.create(model="emb", input=t))[0], TEXTS * 4))
    for t, g in zip(TEXTS * 4, got):
        assert np.abs(g - want[t]).max() < 1e-5


def error(server: Server, body: dict, path: str = "/v1/embeddings") -> tuple[int, dict]:
    r = httpx.post(server.url + path, json=body, timeout=30)
    return r.status_code, r.json()["error"]


@pytest.mark.parametrize("body, param, needle", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "empty"),
    ({"input": [[1, 2], []]}, "input", "input[1] is empty"),
    ({"input": [1] * 300}, "input", "context of 256"),
    ({"input": [1, 512]}, "input", "token id 512"),
    ({"input": [[3, -1]]}, "input", "token id -1"),
    ({"input": 5}, "input", "must be a string, a list of strings"),
    ({"input": [1, "a"]}, "input", "must be a string, a list of strings"),
    ({"input": ["a", None]}, "input", "must be a string, a list of strings"),
    ({}, "input", "Field required"),
    ({"input": [True, 2]}, "input", "must be a string, a list of strings"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"input": "hi", "dimensions": 0}, "dimensions", "from 1 to 64"),
    ({"input": "hi", "dimensions": 65}, "dimensions", "from 1 to 64"),
    ({"input": "hi", "dimensions": "8"}, "dimensions", "dimensions"),
])
def test_bad_requests_name_the_field(emb_server, body, param, needle):
    status, err = error(emb_server, {"model": "emb", **body})
    assert status == 400 and err["param"] == param and needle in err["message"], err
    assert emb_server.healthy()


def test_unknown_model_is_404(emb_server):
    status, err = error(emb_server, {"model": "nope", "input": "hi"})
    assert status == 404 and err["param"] == "model"


def test_embed_server_refuses_generation_and_lists_the_model(emb_server, client):
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        status, err = error(emb_server, {"model": "emb", **body}, path)
        assert status == 400 and "compiled for embeddings" in err["message"] and "/v1/embeddings" in err["message"]
    with pytest.raises(openai.BadRequestError, match="embeddings"):
        client.completions.create(model="emb", prompt="hi")
    assert [m.id for m in client.models.list()] == ["emb"]


def test_generate_server_refuses_embeddings(server):
    status, err = error(server, {"model": "stories", "input": "hi"})
    assert status == 400 and err["message"].startswith("this model was compiled for generation")
    assert "--task embed" in err["message"]


def test_mean_pooling_without_matryoshka(qwen3, tmp_path):
    plan, model, tok = qwen3
    s = Server(plan, tmp_path, "--pooling", "mean", "--model-name", "emb")
    try:
        c = s.client()
        got = vectors(c.embeddings.create(model="emb", input=TEXTS, encoding_format="float"))
        for t, g in zip(TEXTS, got):
            assert np.abs(g - hf_pooled(model, tok.encode(t), "mean")).max() < 1e-4
        status, err = error(s, {"input": "hi", "dimensions": 8})
        assert status == 400 and err["param"] == "dimensions" and "--matryoshka" in err["message"]
        assert c.embeddings.create(model="emb", input="hi", dimensions=64).data[0].embedding   # the full size is fine
    finally:
        s.stop()


def test_embedding_options_need_an_embed_plan(stories_plan):
    p = subprocess.run([sys.executable, "-m", "reft.cli.reft", "run", str(stories_plan), "--serve", "--pooling",
                        "mean", "--port", "0"], capture_output=True, text=True, timeout=120)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 1 and len(lines) == 1 and "compiled for generation" in lines[0], p.stderr
    assert json.loads((stories_plan / "manifest.json").read_text())["task"] == "generate"
