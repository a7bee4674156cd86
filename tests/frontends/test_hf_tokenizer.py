"""Tokenizer loading, special tokens, save_to round trip, on the real test tokenizers."""
from paths import SMOL_TOKENIZER, STORIES_HF
import json
import shutil

import pytest

from reft.errors import ModelError
from reft.frontends.tokenizer import NO_TEMPLATE, Tokenizer

STORIES = str(STORIES_HF)
SMOL = str(SMOL_TOKENIZER)
TEXTS = ["Once upon a time", "  two  spaces\n\nand lines", "café é 中文 😀🎉 ok", ""]


@pytest.fixture(scope="module")
def stories():
    return Tokenizer.from_dir(STORIES)


@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_dir(SMOL)


def test_stories_tokenizer(stories):
    assert stories.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert stories.encode("Once upon a time", add_special_tokens=False) == [403, 407, 261, 378]
    assert stories.decode([1, 403, 407, 261, 378]) == "<s> Once upon a time"
    assert stories.decode([1, 403, 407, 261, 378], skip_special_tokens=True) == "Once upon a time"
    assert (stories.vocab_size, stories.bos_token, stories.bos_token_id) == (512, "<s>", 1)
    assert (stories.eos_token, stories.eos_token_ids) == ("</s>", [2])
    assert stories.token_to_id("▁Once") == 403 and stories.id_to_token(403) == "▁Once"
    assert stories.token_to_id("no such token") is None
    assert stories.chat_template is None
    with pytest.raises(ModelError, match="no chat template"):
        stories.render_chat([{"role": "user", "content": "hi"}])
    assert NO_TEMPLATE.endswith("use --prompt")


def test_smol_tokenizer(smol):
    assert smol.encode("Once upon") == [6403, 1980]  # no BOS added by this tokenizer's post-processor
    assert (smol.bos_token, smol.bos_token_id, smol.eos_token, smol.eos_token_ids) == ("<|im_start|>", 1, "<|im_end|>", [2])
    assert smol.vocab_size == 49152
    assert smol.chat_template == open(f"{SMOL}/chat_template.jinja").read()
    for text in TEXTS:
        assert smol.decode(smol.encode(text)) == text


def test_matches_hf_ids():
    from transformers import AutoTokenizer

    for d in (STORIES, SMOL):
        ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
        for text in TEXTS:
            assert ours.encode(text) == hf(text)["input_ids"]


def _copy_tokenizer(src, dst, **files):
    dst.mkdir(exist_ok=True)
    shutil.copy(f"{src}/tokenizer.json", dst / "tokenizer.json")
    for name, obj in files.items():
        (dst / f"{name}.json").write_text(json.dumps(obj))
    return dst


def test_eos_ids_union_in_order(tmp_path):
    d = _copy_tokenizer(STORIES, tmp_path, generation_config={"eos_token_id": [5, 2]},
                        tokenizer_config={"eos_token": {"content": "</s>"}, "bos_token": "<s>"})
    t = Tokenizer.from_dir(d, hf_config={"eos_token_id": 7, "bos_token_id": 9})
    assert t.eos_token_ids == [5, 2, 7] and t.eos_token == "</s>" and t.bos_token_id == 1


def test_special_tokens_from_config_only(tmp_path):
    d = _copy_tokenizer(STORIES, tmp_path, config={"eos_token_id": [2, 0], "bos_token_id": 1})
    t = Tokenizer.from_dir(d)
    assert (t.bos_token, t.bos_token_id, t.eos_token, t.eos_token_ids) == ("<s>", 1, "</s>", [2, 0])


def test_template_list_form(tmp_path):
    tc = {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ bos_token }}"}],
          "bos_token": "<s>"}
    t = Tokenizer.from_dir(_copy_tokenizer(STORIES, tmp_path, tokenizer_config=tc))
    assert t.chat_template == "D{{ bos_token }}"
    assert t.render_chat([]) == "D<s>"


def test_template_file_wins(tmp_path):
    d = _copy_tokenizer(STORIES, tmp_path, tokenizer_config={"chat_template": "from config"})
    (d / "chat_template.jinja").write_text("from file")
    assert Tokenizer.from_dir(d).chat_template == "from file"


@pytest.mark.parametrize("src", [STORIES, SMOL])
def test_save_to_round_trip(tmp_path, src):
    a = Tokenizer.from_dir(src)
    a.save_to(tmp_path / "plan" / "tokenizer")
    b = Tokenizer.from_dir(tmp_path / "plan" / "tokenizer")
    for attr in ("bos_token", "bos_token_id", "eos_token", "eos_token_ids", "chat_template", "vocab_size"):
        assert getattr(a, attr) == getattr(b, attr), attr
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
    assert a.special_tokens() == b.special_tokens()
    gen = json.loads((tmp_path / "plan" / "tokenizer" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == a.eos_token_ids


def test_saved_dir_loads_in_transformers(tmp_path, smol):
    from transformers import AutoTokenizer

    smol.save_to(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == smol.render_chat(msgs)


def test_keeps_eos_from_config_when_saved(tmp_path):
    d = _copy_tokenizer(STORIES, tmp_path / "src", config={"eos_token_id": [2, 0]})
    Tokenizer.from_dir(d).save_to(tmp_path / "out")
    assert Tokenizer.from_dir(tmp_path / "out").eos_token_ids == [2, 0]


def test_missing_and_invalid(tmp_path):
    with pytest.raises(ModelError, match="no such model directory"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(ModelError, match="tokenizer.json: no such file"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer.json: cannot load tokenizer") as e:
        Tokenizer.from_dir(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ModelError, match="cannot load tokenizer"):
        Tokenizer.from_dir(tmp_path)
    _copy_tokenizer(STORIES, tmp_path, tokenizer_config=[1])
    with pytest.raises(ModelError, match="tokenizer_config.json: expected a JSON object"):
        Tokenizer.from_dir(tmp_path)
