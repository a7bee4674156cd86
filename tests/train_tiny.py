"""A tiny Llama (hidden 32, 2 layers, the stories260K tokenizer) and a two-example alpaca file for
training tests: small enough that the reference backend memorises the answers in seconds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from hf_tiny import STORIES_TOKENIZER

# Llama-2 style: the assistant turn ends with </s> (the EOS of the stories260K tokenizer)
INST = ("{% for m in messages %}{% if m.role == 'user' %}<s>[INST] {{ m.content }} [/INST]"
        "{% elif m.role == 'assistant' %} {{ m.content }}</s>{% else %}{{ m.content }}\n{% endif %}{% endfor %}")
EXAMPLES = [{"instruction": "Who is Lily?", "output": "A little girl."},
            {"instruction": "Where is the dog?", "output": "In the park."}]


def tiny_llama(out: Path, seed: int = 0):
    """Write the model folder; returns (folder, transformers model)."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                                   initializer_range=0.2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(STORIES_TOKENIZER / f, out / f)
        (out / f).chmod(0o644)
    return out, model


def sft_files(d: Path) -> tuple[Path, Path]:
    """(alpaca data file, chat template file) in folder d."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "data.json").write_text(json.dumps(EXAMPLES))
    (d / "inst.jinja").write_text(INST)
    return d / "data.json", d / "inst.jinja"
