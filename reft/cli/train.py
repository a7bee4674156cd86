"""`reft train` (pretraining, full / freeze / LoRA SFT) and `reft export` (a checkpoint -> a model
folder, folding a LoRA adapter into its base with --merge). Registered on the `reft` group in
reft/cli/reft.py; the options are reft.cpp's, in kebab-case (docs/training.md has them all)."""
from __future__ import annotations

from pathlib import Path

import click

from ..backends.registry import names as backend_names
from .common import friendly_errors, show_progress


def _list(values) -> tuple[str, ...]:
    """Repeated and/or comma-separated values, in order."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


@click.command(context_settings={"show_default": True})
@click.option("--model", required=True, help="Model to start from: a Hugging Face folder, a .gguf file, or a"
              " bundled name (stories260K). LoRA on a .gguf keeps its quantized weights in their blocks"
              " (QLoRA); full / freeze train them as float32.")
@click.option("--datasets", "datasets", multiple=True, required=True, metavar="KIND@PATH",
              help="Training data, repeatable or comma-separated. KIND: text (pretraining: .txt, JSONL/JSON/parquet"
                   " with a `text` field, or a folder of them), alpaca (instruction/input/output records) or"
                   " messages (OpenAI `messages` / ShareGPT `conversations` records).")
@click.option("--checkpoint-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where checkpoints (checkpoint-<step>/) and metrics.jsonl go.")
@click.option("--stage", type=click.Choice(["pretrain", "sft"]), default="sft",
              help="pretrain: next-token loss on every token of text@ data, packed into --block-size blocks. sft:"
                   " loss only on the assistant replies (and their end-of-turn token) of alpaca@ / messages@ data.")
@click.option("--fine-tuning-type", type=click.Choice(["full", "freeze", "lora"]), default="lora",
              help="full: train every weight. freeze: train only the layers --freeze-trainable-layers picks. lora:"
                   " train low-rank adapters on --lora-targets and save a PEFT adapter.")
@click.option("--freeze-trainable-layers", type=int, default=2, metavar="N",
              help="freeze: train the last N decoder layers (N < 0: the first |N|); the rest stays frozen.")
@click.option("--lora-rank", type=click.IntRange(1), default=8, help="lora: rank r of each adapter.")
@click.option("--lora-alpha", type=click.FloatRange(0, min_open=True), default=None,
              help="lora: the update is scaled by alpha / r. [default: 2 x --lora-rank]")
@click.option("--lora-dropout", type=click.FloatRange(0, 1), default=0.0,
              help="lora: dropout probability on the adapters' input, as PEFT's lora_dropout (below 1; masks"
                   " drawn from --seed, the step and the micro-batch, so --resume redraws them).")
@click.option("--lora-targets", multiple=True, default=("q_proj,v_proj",), metavar="MODULE[,MODULE...]",
              help="lora: the linear modules that get adapters (q_proj k_proj v_proj o_proj gate_proj up_proj"
                   " down_proj).")
@click.option("--cutoff-len", type=click.IntRange(2), default=1024,
              help="sft: longest example in tokens; longer ones are truncated (and counted).")
@click.option("--block-size", type=click.IntRange(2), default=1024,
              help="pretrain: tokens per training block (documents are packed back to back).")
@click.option("--batch-size", type=click.IntRange(1), default=4, help="Examples (or blocks) per micro-batch.")
@click.option("--grad-accumulation-steps", type=click.IntRange(1), default=1,
              help="Micro-batches whose gradients are summed into one optimizer step.")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=5e-5, help="Peak learning rate.")
@click.option("--lr-scheduler-type", type=click.Choice(["constant", "linear", "cosine", "step"]), default="cosine",
              help="How the learning rate goes from the peak (after warmup) towards the end.")
@click.option("--warmup-steps", type=click.IntRange(0), default=0,
              help="Steps of linear warmup from 0 to the peak learning rate.")
@click.option("--learning-rate-decay-frac", type=click.FloatRange(0, 1), default=0.0,
              help="The final learning rate as a fraction of the peak (linear, cosine, step).")
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0,
              help="AdamW decoupled weight decay (not applied to norms and biases).")
@click.option("--max-grad-norm", type=click.FloatRange(0), default=1.0,
              help="Clip the global gradient norm to this; 0 turns clipping off.")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), default=3.0,
              help="Passes over the training data (may be fractional); --max-steps overrides it.")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Optimizer steps to train for.")
@click.option("--save-every", type=click.IntRange(1), default=500,
              help="Save a checkpoint every N steps (the last step is always saved).")
@click.option("--save-total-limit", type=click.IntRange(1), default=None,
              help="Keep only the newest N checkpoints. [default: keep all]")
@click.option("--eval-split", type=click.FloatRange(0), default=0.0,
              help="Hold out this fraction (< 1) or number (>= 1) of examples for evaluation.")
@click.option("--eval-every", type=click.IntRange(0), default=0,
              help="Evaluate on the held-out examples every N steps (and at the end); 0 = only at the end.")
@click.option("--resume", is_flag=False, flag_value="latest", default=None, metavar="[CHECKPOINT]",
              help="Continue a run from CHECKPOINT, or alone from the newest one in --checkpoint-dir; the run's"
                   " options, data and model must be the same (--max-steps may grow for a constant schedule).")
@click.option("--seed", type=int, default=42, help="Seed of the data order, the LoRA init and LoRA dropout.")
@click.option("--chat-template", default=None, metavar="FILE",
              help="sft: a Jinja chat template to render conversations with instead of the model's own (it is"
                   " saved with the checkpoint).")
@click.option("--threads", "-t", type=click.IntRange(1), default=None,
              help="CPU threads for the cpu backend. [default: physical cores]")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute each layer's activations in the backward pass: less memory, ~30% more compute.")
@click.option("--skip-bad-lines", is_flag=True,
              help="Skip (and count) malformed dataset records instead of stopping at the first.")
@click.option("--backend", type=click.Choice(backend_names()), default=None,
              help="cpu: generated C++ kernels; reference: numpy (slow, the oracle). [default: cpu where it can"
                   " compile the training graph, else reference, with a warning]")
@click.option("--model-def", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A model-definition .py file for an architecture reft does not ship.")
@friendly_errors
def train(**kw):
    """Train a model: pretraining, full or partial (freeze) fine-tuning, or LoRA.

    \b
    Examples:
      reft train --model SmolLM2-135M-Instruct --datasets alpaca@data.json \\
                 --fine-tuning-type lora --lora-targets q_proj,v_proj --checkpoint-dir ckpt/
      reft train --model stories260K --stage pretrain --datasets text@stories.txt \\
                 --fine-tuning-type full --block-size 256 --max-steps 200 --checkpoint-dir ckpt/
      reft train ... --resume                  # continue from the newest checkpoint in ckpt/

    \b
    Each checkpoint-<step>/ is a Hugging Face model folder (full, freeze) that
    `reftc compile` reads, or a PEFT adapter (lora) that `reft export --merge`
    folds into its base model. Progress goes to stderr, one record per step to
    CHECKPOINT_DIR/metrics.jsonl. See docs/training.md.
    """
    from ..runtime.train.options import TrainArgs
    from ..runtime.train.trainer import Trainer

    kw["datasets"] = _list(kw["datasets"])
    kw["lora_targets"] = _list(kw["lora_targets"])
    kw["checkpoint_dir"] = str(kw["checkpoint_dir"])
    kw["model_def"] = str(kw["model_def"]) if kw["model_def"] else None
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    trainer = Trainer(TrainArgs(**kw), log=log, progress=show_progress())
    final = trainer.train()
    kind = "a PEFT LoRA adapter (reft export --merge it)" if kw["fine_tuning_type"] == "lora" else \
        "a Hugging Face model folder (reftc compile it)"
    click.echo(f"trained {trainer.step} steps; final checkpoint {final}: {kind}")


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Model folder to write (config.json, model.safetensors, tokenizer files).")
@click.option("--merge", is_flag=True, help="CHECKPOINT is a LoRA adapter: fold it into its base model's weights.")
@click.option("--base", default=None,
              help="--merge: the base model. [default: the adapter's base_model_name_or_path]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Storage dtype of the written weights.")
@friendly_errors
def export(checkpoint, out, merge, base, dtype):
    """Write CHECKPOINT as a standalone Hugging Face model folder.

    \b
    reft export ckpt/checkpoint-300 --merge -o merged/   # LoRA adapter + its base -> one model
    reft export ckpt/checkpoint-300 -o model/            # a full checkpoint without trainer state
    """
    from ..errors import ReftError
    from ..frontends.source import open_source
    from ..frontends.tokenizer import Tokenizer
    from ..runtime.train.checkpoint import save_model
    from ..runtime.train.lora_adapter import CONFIG, merge_lora, read_lora_adapter

    if not checkpoint.is_dir():
        raise ReftError(f"{checkpoint}: no such checkpoint folder")
    adapter = (checkpoint / CONFIG).is_file()
    if adapter and not merge:
        raise ReftError(f"{checkpoint} is a LoRA adapter; pass --merge to fold it into its base model")
    if merge and not adapter:
        raise ReftError(f"{checkpoint}: --merge needs a LoRA adapter ({CONFIG}); this is not one")
    if adapter:
        spec, tensors = read_lora_adapter(checkpoint)
        base = base or spec.base_model
        if not base:
            raise ReftError(f"{checkpoint / CONFIG} names no base model; pass --base MODEL")
        source = open_source(base)
        weights = merge_lora(source.weights, spec, tensors)
    else:
        source = open_source(checkpoint)
        weights = source.weights
    tokenizer = Tokenizer.from_dir(checkpoint) if (checkpoint / "tokenizer.json").is_file() else source.tokenizer
    save_model(out, source.config, weights, tokenizer, dtype=dtype)
    click.echo(f"wrote {out}")
