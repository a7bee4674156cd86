"""render_chat against transformers' apply_chat_template, and template errors."""
from paths import SMOL_TOKENIZER
import pytest

from reft.errors import ModelError
from reft.frontends.tokenizer import Tokenizer

SMOL = str(SMOL_TOKENIZER)

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Bonjour, ça va? 中文 😀"}, {"role": "assistant", "content": "Oui."},
     {"role": "user", "content": "Et toi?"}],
    [{"role": "user", "content": "A"}, {"role": "user", "content": "B"}],
]

# exercises the environment, not just the model's template: tojson (non-ASCII, indent), loop controls,
# {% generation %}, whitespace control, namespace, extra variables, bos/eos/unk/pad tokens
FANCY = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role == 'skip' %}{% continue %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m.role == 'assistant' %}{% generation %}[A]{{ m.content }}{{ eos_token }}{% endgeneration %}
  {% else %}[{{ m.role | upper }}]{{ m.content | tojson }}
  {% endif %}
{% endfor %}
{{ messages | tojson(indent=2) }}|{{ tools | tojson }}|{{ ns.n }}|{{ unk_token }}{{ pad_token }}
{%- if add_generation_prompt %}[A]{% endif %}{{ extra_var | default('none') }}"""


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    return Tokenizer.from_dir(SMOL), AutoTokenizer.from_pretrained(SMOL)


@pytest.mark.parametrize("i", range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False])
def test_matches_transformers(tokenizers, i, gen):
    ours, hf = tokenizers
    want = hf.apply_chat_template(CHATS[i], tokenize=False, add_generation_prompt=gen)
    assert ours.render_chat(CHATS[i], add_generation_prompt=gen) == want


@pytest.mark.parametrize("i", range(len(CHATS)))
def test_environment_matches_transformers(tokenizers, i):
    ours, hf = tokenizers
    msgs = CHATS[i] + [{"role": "skip", "content": "x"}, {"role": "assistant", "content": "«é»"}]
    want = hf.apply_chat_template(msgs, chat_template=FANCY, tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(msgs, template=FANCY) == want
    want = hf.apply_chat_template(msgs, chat_template=FANCY, tokenize=False, extra_var=[1, "ü"])
    assert ours.render_chat(msgs, add_generation_prompt=False, template=FANCY, extra_var=[1, "ü"]) == want


def test_empty_conversation_renders(tokenizers):
    # transformers refuses an empty conversation outright; we leave that to the caller
    assert tokenizers[0].render_chat([], template=FANCY) == "<|im_start|>[]|null|0|<|endoftext|><|im_end|>[A]none"


def test_strftime_now(tokenizers):
    import datetime

    out = tokenizers[0].render_chat([], template="{{ strftime_now('%Y') }}")
    assert out == str(datetime.date.today().year)


@pytest.mark.parametrize("template, words", [
    ("{% if %}", "syntax error at line 1"),
    ("{{ raise_exception('only user and assistant roles') }}", "rejected the conversation: only user and assistant"),
    ("{{ messages[0]['content'] + 1 }}", "chat template failed"),
    ("{{ messages.__class__.__subclasses__() }}", "chat template failed"),  # sandbox
    ("{% for m in messages %}{% set m.x = 1 %}{% endfor %}", "chat template"),
])
def test_template_errors(tokenizers, template, words):
    with pytest.raises(ModelError, match=words) as e:
        tokenizers[0].render_chat([{"role": "user", "content": "hi"}], template=template)
    assert "\n" not in str(e.value)


def test_immutable_sandbox(tokenizers):
    with pytest.raises(ModelError, match="chat template failed: SecurityError"):
        tokenizers[0].render_chat([{"role": "user", "content": "hi"}], template="{{ messages.append(1) }}")
