"""Training data: pretraining blocks, SFT loss masks (assistant tokens + end of turn only) with the
SmolLM2 GGUF tokenizer and with the bundled stories260K tokenizer under an explicit template, bad
records named by file:line, and a loader whose order survives a save/restore."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from paths import SMOLLM2_GGUF

from reft.compiler import ASSETS
from reft.errors import ReftError
from reft.frontends.tokenizer import Tokenizer
from reft.runtime.train.data import IGNORE, load_datasets, sft_example
from reft.runtime.train.loader import Loader, collate, split_eval
from reft.runtime.train.records import DatasetError
from reft.runtime.train.sft import encode_conversation, resolve_chat_template

# Llama-2 style: the assistant turn ends with the EOS token </s> (id 2 in stories260K)
INST = ("{% for m in messages %}{% if m.role == 'user' %}<s>[INST] {{ m.content }} [/INST]"
        "{% elif m.role == 'assistant' %} {{ m.content }}</s>{% else %}{{ m.content }}\n{% endif %}{% endfor %}")
# renders the generation prompt differently from an assistant turn's header: the span search falls back
DIFFERENT = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
             "{% if add_generation_prompt %}<|prompt|>{% endif %}")


@pytest.fixture(scope="module")
def stories():
    return Tokenizer.from_dir(ASSETS / "stories260K")


@pytest.fixture(scope="module")
def smol():
    if SMOLLM2_GGUF is None:
        pytest.skip("SmolLM2 GGUF not present (tools/fetch_smollm2.py)")
    from reft.frontends.source import open_source

    return open_source(SMOLLM2_GGUF).tokenizer


def trained_text(tok, ex):
    """The tokens that are targets, decoded, and the ones that are not."""
    ids = ex.input_ids
    tgt = ex.targets
    assert ((tgt[:-1] == ids[1:]) | (tgt[:-1] == IGNORE)).all() and tgt[-1] == IGNORE
    return tok.decode(tgt[tgt != IGNORE].tolist())


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_smollm2_messages_train_only_assistant_turns(smol, tmp_path):
    conv = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red, of course."}]
    f = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    ds = load_datasets([f"messages@{f}"], smol, cutoff_len=512)
    (ex,) = ds.examples
    assert trained_text(smol, ex) == "Blue.<|im_end|>Red, of course.<|im_end|>"
    im_end = smol.token_to_id("<|im_end|>")
    assert (ex.targets == im_end).sum() == 2                    # the eos of each turn is learned
    rendered = smol.render_chat(conv, add_generation_prompt=False)
    assert ex.input_ids.tolist() == smol.encode(rendered, add_special_tokens=False)
    assert "system" in smol.decode(ex.input_ids.tolist())       # the template's default system turn, untrained
    assert ds.stats.target_tokens == int((ex.targets != IGNORE).sum())


def test_smollm2_alpaca_and_sharegpt(smol, tmp_path):
    a = tmp_path / "alpaca.json"
    a.write_text(json.dumps([{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                             {"instruction": "Say hi.", "output": "Hi!", "system": "Be brief."}], indent=2))
    s = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": "Ping"},
                                                                  {"from": "gpt", "value": "Pong"}]}])
    ds = load_datasets([f"alpaca@{a}", f"messages@{s}"], smol)
    got = [trained_text(smol, e) for e in ds.examples]
    assert got == ["5<|im_end|>", "Hi!<|im_end|>", "Pong<|im_end|>"]
    prompt = smol.decode(ds.examples[0].input_ids.tolist())
    assert "Add the numbers.\n2 and 3<|im_end|>" in prompt
    assert "Be brief." in smol.decode(ds.examples[1].input_ids.tolist())


def test_explicit_template_with_eos_end_of_turn(stories, tmp_path):
    tpl = tmp_path / "inst.jinja"
    tpl.write_text(INST)
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "ok then"}])
    ds = load_datasets([f"alpaca@{f}"], stories, chat_template=resolve_chat_template(str(tpl)))
    (ex,) = ds.examples
    assert ex.targets[ex.targets != IGNORE][-1] == 2            # </s> is a target: the model learns to stop
    assert trained_text(stories, ex) == "ok then</s>"
    assert stories.decode(ex.input_ids[ex.targets == IGNORE].tolist()).startswith("<s>")


def test_span_fallback_for_templates_whose_prompt_differs(stories):
    msgs = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "good day"},
            {"role": "user", "content": "bye"}, {"role": "assistant", "content": "farewell friend"}]
    ids, mask = encode_conversation(stories, msgs, DIFFERENT)
    trained = stories.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "good day</s>farewell friend</s>"


def test_cutoff_len_truncates_and_drops(stories, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "w " * 40, "output": "yes"},
                                           {"instruction": "hi", "output": "a long answer " * 10}])
    ds = load_datasets([f"alpaca@{f}"], stories, cutoff_len=30, chat_template=INST)
    assert ds.stats.truncated == 2 and ds.stats.no_target == 1 and len(ds.examples) == 1
    assert len(ds.examples[0]) == 30
    assert "truncated" in ds.stats.summary() and "dropped" in ds.stats.summary()


def test_text_blocks(stories, tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("Once upon a time there was a cat.")
    write_jsonl(d / "b.jsonl", [{"text": "The dog ran."}, {"text": "Sun."}])
    ds = load_datasets([f"text@{d}"], stories, block_size=8)
    docs = [stories.encode(t) + [2] for t in ("Once upon a time there was a cat.", "The dog ran.", "Sun.")]
    stream = sum(docs, [])
    got = np.concatenate([e.input_ids for e in ds.examples]).tolist()
    assert got == stream[:len(got)] and len(stream) - len(got) in (0, 1)   # a last 1-token block has no target
    assert all(len(e) == 8 for e in ds.examples[:-1])
    for e in ds.examples:
        starts = np.r_[True, e.segments[1:] != e.segments[:-1]]
        assert (e.positions[starts] == 0).all() and (np.diff(e.positions)[~starts[1:]] == 1).all()
        has_next = np.r_[~starts[1:], False]            # the last token of each sequence has no target
        assert (e.targets[~has_next] == IGNORE).all()
        assert (e.targets[has_next] == e.input_ids[1:][has_next[:-1]]).all()
    # every document's EOS is predicted, unless a block boundary cut it from its document
    eos_at_block_start = sum(int(e.input_ids[0] == 2) for e in ds.examples) + (len(stream) > len(got))
    assert sum(int((e.targets == 2).sum()) for e in ds.examples) == 3 - eos_at_block_start
    assert ds.stats.read.files == 2 and ds.stats.read.records == 3


def test_malformed_records_are_named(stories, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": 3}\n{not json\n{"text": "also fine"}\n')
    with pytest.raises(DatasetError, match=r"bad\.jsonl:3: `text` is int"):
        load_datasets([f"text@{f}"], stories)
    ds = load_datasets([f"text@{f}"], stories, skip_bad_lines=True)
    assert ds.stats.read.bad == 2 and ds.stats.read.records == 2 and "2 malformed" in ds.stats.summary()
    a = tmp_path / "bad.json"
    a.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": "x"}\n]')
    with pytest.raises(DatasetError, match=r"bad\.json:3: missing string field `output`"):
        load_datasets([f"alpaca@{a}"], stories, chat_template=INST)
    m = write_jsonl(tmp_path / "m.jsonl", [{"conversations": [{"from": "alien", "value": "x"}]}])
    with pytest.raises(DatasetError, match=r"m\.jsonl:1: message 0: unknown from 'alien'"):
        load_datasets([f"messages@{m}"], stories, chat_template=INST)


@pytest.mark.parametrize("spec,match", [("text@/no/such/file.txt", "no such file"), ("poems@x", "unknown kind"),
                                        ("text", "KIND@PATH")])
def test_bad_specs(stories, spec, match):
    with pytest.raises(DatasetError, match=match):
        load_datasets([spec], stories)


def test_no_template_is_a_clear_error(stories, tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "output": "ok"}])
    with pytest.raises(DatasetError, match="no chat template"):
        load_datasets([f"alpaca@{f}"], stories)
    with pytest.raises(DatasetError, match="no such file"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))


def test_parquet(stories, tmp_path, monkeypatch):
    f = tmp_path / "t.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetError, match="needs pyarrow"):
        load_datasets([f"text@{f}"], stories)
    monkeypatch.undo()
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one story.", "two stories."], "id": [1, 2]}), f)
    ds = load_datasets([f"text@{f}"], stories, block_size=64)
    assert ds.stats.read.records == 2 and len(ds.examples) == 1


def examples_of(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(2, 6))
        out.append(sft_example(rng.integers(3, 100, k).tolist(), [False] + [True] * (k - 1)))
    return out


def test_loader_order_is_deterministic_and_resumable():
    ex = examples_of(10)
    a, b = Loader(ex, 3, seed=7), Loader(ex, 3, seed=7)
    first = [a.next_batch().input_ids.tolist() for _ in range(9)]   # crosses two epoch ends
    assert first == [b.next_batch().input_ids.tolist() for _ in range(9)]
    assert a.steps_per_epoch == 4 and a.epoch == 2
    c = Loader(ex, 3, seed=7)
    for _ in range(5):
        c.next_batch()
    state = json.loads(json.dumps(c.state_dict()))
    d = Loader(ex, 3, seed=7)
    d.load_state_dict(state)
    assert [d.next_batch().input_ids.tolist() for _ in range(4)] == first[5:9]
    other = Loader(ex, 3, seed=8)
    assert [other.next_batch().input_ids.tolist() for _ in range(4)] != first[:4]
    with pytest.raises(ReftError, match="data order differs"):
        Loader(ex[:-1], 3, seed=7).load_state_dict(state)
    with pytest.raises(ReftError, match="seed"):
        Loader(ex, 3, seed=8).load_state_dict(state)


def test_collate_numbers_sequences_through_the_batch(stories, tmp_path):
    f = tmp_path / "t.jsonl"
    write_jsonl(f, [{"text": "Once upon a time."}, {"text": "The end."}, {"text": "A cat sat."}])
    blocks = load_datasets([f"text@{f}"], stories, block_size=6).examples
    b = collate(blocks[:2])
    assert b.tokens == len(blocks[0]) + len(blocks[1]) and b.examples == 2
    n0 = int(blocks[0].segments.max()) + 1
    assert b.seq_ids.tolist() == blocks[0].segments.tolist() + (blocks[1].segments + n0).tolist()
    assert set(b.feeds()) == {"input_ids", "positions", "seq_ids", "targets"}
    assert all(v.dtype == np.int32 for v in b.feeds().values())


def test_split_eval():
    ex = examples_of(20)
    tr, ev = split_eval(ex, 0.25, seed=1)
    assert len(tr) == 15 and len(ev) == 5 and not {id(e) for e in tr} & {id(e) for e in ev}
    assert [id(e) for e in split_eval(ex, 0.25, seed=1)[1]] == [id(e) for e in ev]
    assert len(split_eval(ex, 3, seed=1)[1]) == 3
    with pytest.raises(ReftError):
        split_eval(ex, 20, seed=1)
