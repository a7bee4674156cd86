"""The training loop of `reft train`: data -> compiled train plan -> steps -> checkpoints.

  Trainer(args).train() -> the final checkpoint folder

Setup: open the model (reft.frontends.source), read and tokenize the datasets, hold out the eval
split, order the micro-batches (Loader), choose what trains (full: every weight; freeze: the
chosen layers; lora: adapters from passes/add_lora.py), check a --resume checkpoint belongs to
this model and run, then compile the train plan (reft.compiler.compile_train_plan) into a
temporary folder inside the checkpoint dir and load it through the backend registry. From then on
the trainer talks only to the Executable: `run(feeds, entry)` and `read_weights(names)`.

One optimizer step: `train_step` (forward, backward, clipping, AdamW in one call) or, with
--grad-accumulation-steps k > 1, `train_grad` on each of k micro-batches, the gradients summed here
in float32, then `apply_update`. loss_scale is 1 / (target tokens of the k micro-batches), so the
loss is the mean over every target token of the step and the gradients need no averaging.

Notable:
- Resuming compiles the plan with the checkpoint's trained tensors and AdamW moments in place of
  the fresh ones, restores the step, the loader's (epoch, position) and the schedule, and so
  continues bit for bit: the only randomness of a run is the data order (a function of seed and
  epoch), the LoRA init (saved in the checkpoint) and LoRA dropout's masks, whose key is a function
  of (seed, step, micro-batch) (dropout_key; the masks then depend on the module and the element
  only: reft/ir/ops/dropout.py).
- LoRA on a GGUF model keeps the frozen base in its quantized blocks (QLoRA; passes/add_lora.py).
- metrics.jsonl gets one record per step ({step, loss, lr, grad_norm, tokens, tokens_per_s,
  elapsed}) and per evaluation ({step, eval_loss, eval_tokens, elapsed}); a resumed run first
  drops the records after its checkpoint's step.
- The final step is always saved; full / freeze / pretrain checkpoints are Hugging Face model
  folders (reftc compile and transformers load them), LoRA ones PEFT adapters.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ... import backends
from ...backends.base import BackendOptions, Executable
from ...errors import ReftError
from ...frontends.source import open_source
from ...ir import GraphBuilder
from ...passes.add_lora import A_SUFFIX, B_SUFFIX, DROPOUT_KEY, LoraConfig, adapted_modules
from ...passes.add_optimizer import LR, NORM, STEP, AdamW, state_names
from .checkpoint import (CheckpointDir, CheckpointError, TrainerState, fingerprint, model_identity,
                         read_trainer_state, read_weights, write_hf_model)
from .data import load_datasets
from .loader import Batch, Loader, collate, split_eval
from .lora_adapter import LoraSpec, read_lora_adapter, write_lora_adapter
from .options import TrainArgs, freeze_trainable, run_identity, schedule_matches
from .schedule import LRSchedule
from .sft import resolve_chat_template

METRICS = "metrics.jsonl"


class Trainer:
    def __init__(self, args: TrainArgs, *, log: Callable[[str], None] = lambda s: None, progress: bool = False):
        args.check()
        self.args, self.log, self.progress = args, log, progress
        self.source = open_source(args.model, args.model_def)
        from ...compiler import model_config

        self.cfg = model_config(self.source)
        b = GraphBuilder("forward")
        self.source.family.build(self.cfg, b)
        self.params = {n.name: n.out.shape for n in b.graph.params()}
        self.template = resolve_chat_template(args.chat_template)
        self._data()
        self._trainable(b.graph)
        self.identity = {"model": model_identity(self.source.config, self.params),
                         "run configuration": fingerprint(run_identity(args, self.template))}
        self.step, self.elapsed0 = 0, 0.0
        restored = self._resume() if args.resume else {}
        self.created = not Path(args.checkpoint_dir).exists()
        self.ckpt = CheckpointDir(args.checkpoint_dir, args.save_total_limit)
        if not args.resume and self.ckpt.checkpoints():
            raise CheckpointError(f"{self.ckpt.root} already holds checkpoints; continue them with --resume or"
                                  " train into another --checkpoint-dir")
        self.exe = self._compile(restored)

    # -- setup -----------------------------------------------------------------------------------
    def _data(self) -> None:
        a = self.args
        ds = load_datasets(list(a.datasets), self.source.tokenizer, block_size=a.block_size, cutoff_len=a.cutoff_len,
                           chat_template=self.template, skip_bad_lines=a.skip_bad_lines)
        self.log(f"data: {ds.stats.summary()}")
        train, held = split_eval(ds.examples, a.eval_split, a.seed)
        self.loader = Loader(train, a.batch_size, a.seed)
        self.eval_batches = [collate(held[i:i + a.batch_size]) for i in range(0, len(held), a.batch_size)]
        micro = self.loader.steps_per_epoch
        per_epoch = -(-micro // a.grad_accumulation_steps)
        self.total = a.max_steps or max(1, math.ceil(a.epochs * micro / a.grad_accumulation_steps))
        self.schedule = LRSchedule(a.lr_scheduler_type, a.learning_rate, self.total, a.warmup_steps,
                                   a.learning_rate_decay_frac)
        self.log(f"{len(train)} training examples ({micro} micro-batches of {a.batch_size}, {per_epoch} optimizer"
                 f" steps an epoch), {len(held)} held out; {self.total} steps")

    def _trainable(self, graph) -> None:
        a = self.args
        self.lora = None
        if a.fine_tuning_type == "full":
            self.trainable = tuple(self.params)
        elif a.fine_tuning_type == "freeze":
            self.trainable = freeze_trainable(self.params, self.cfg.num_hidden_layers, a.freeze_trainable_layers)
        else:
            self.lora = LoraConfig(a.lora_rank, a.alpha, tuple(a.lora_targets), a.lora_dropout, a.seed)
            self.lora.check()
            modules = adapted_modules(graph, self.lora.targets)
            self.trainable = tuple(m + s for m in modules for s in (A_SUFFIX, B_SUFFIX))
        if not self.trainable:
            raise ReftError("no trainable parameters")

    def _resume(self) -> dict[str, np.ndarray]:
        """The checkpoint's tensors to compile in; restores step, loader and elapsed time."""
        a = self.args
        path = Path(a.resume)
        if a.resume == "latest":
            latest = CheckpointDir(a.checkpoint_dir).latest() if Path(a.checkpoint_dir).is_dir() else None
            if latest is None:
                raise CheckpointError(f"--resume: no complete checkpoint in {a.checkpoint_dir}")
            path = latest
        state = read_trainer_state(path, expect=self.identity)
        if not schedule_matches(state.scheduler, self.schedule.state_dict()):
            raise CheckpointError(f"--resume {path}: the checkpoint's lr schedule {state.scheduler} differs from this"
                                  f" run's {self.schedule.state_dict()}")
        if state.step >= self.total:
            raise CheckpointError(f"--resume {path}: the checkpoint is at step {state.step}, this run ends at"
                                  f" {self.total} (raise --max-steps or --epochs to train on)")
        self.loader.load_state_dict(state.data)
        if self.lora:
            _, tensors = read_lora_adapter(path)
        else:
            tensors = read_weights(path / "model.safetensors")
        restored = {}
        for name in self.trainable:
            for n in (name, *state_names(name)):
                src = state.optimizer if n.startswith("optim.") else tensors
                if n not in src:
                    raise CheckpointError(f"--resume {path}: the checkpoint lacks tensor {n}")
                restored[n] = src[n]
        self.step, self.elapsed0 = state.step, float(state.metrics.get("elapsed", 0.0))
        self.log(f"resuming from {path} at step {self.step}")
        return restored

    def _compile(self, restored: dict) -> Executable:
        from ...compiler import TrainPlanOptions, compile_train_plan

        a = self.args
        tokens = max([self.loader.max_batch_tokens()] + [b.tokens for b in self.eval_batches])
        opts = TrainPlanOptions(
            backend=a.backend, trainable=None if self.lora else self.trainable, lora=self.lora,
            optimizer=AdamW(weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm),
            gradient_checkpointing=a.gradient_checkpointing, accumulate=a.grad_accumulation_steps > 1,
            eval=bool(self.eval_batches), max_batch_tokens=tokens, threads=a.threads)
        self.plan_dir = Path(tempfile.mkdtemp(prefix=".train-plan-", dir=self.ckpt.root))
        names = [a.backend] if a.backend else [backends.default().name, "reference"]
        for i, name in enumerate(dict.fromkeys(names)):
            try:
                return self._load(compile_train_plan(self.source, self.plan_dir / "plan",
                                                     dataclasses.replace(opts, backend=name), restored), name)
            except ReftError as e:
                if a.backend or name == "reference":
                    self.close()
                    raise ReftError(f"the {name} backend cannot run training: {e}"
                                    + ("" if name == "reference" else "; try --backend reference")) from None
                self.log(f"warning: the {name} backend cannot run training ({e}); using the reference backend"
                         " (numpy, slow)")
        raise AssertionError("unreachable")

    def _load(self, plan_dir: Path, name: str) -> Executable:
        from ..plan import Plan

        plan = Plan(plan_dir)
        exe = backends.load(plan, BackendOptions(threads=self.args.threads))
        if not isinstance(exe, Executable):
            raise ReftError("its executable has no read_weights, so trained weights cannot be saved")
        self.entries, self.backend_name = set(plan.entry_points), name
        params = plan.graph(plan.entry_points[0]).params()
        sizes = {n.name: n.out.type.numel() for n in params}
        quantized = [n.out.type for n in params if n.out.type.quantized]      # QLoRA's base
        mib = sum(t.nbytes() for t in quantized) / 2**20
        kept = f"; {len(quantized)} frozen matrices stay quantized ({mib:.1f} MiB)" if quantized else ""
        self.log(f"compiled the train plan ({', '.join(plan.entry_points)}) for the {name} backend;"
                 f" {sum(sizes[n] for n in self.trainable):,} trainable parameters{kept}")
        return exe

    def close(self) -> None:
        """Remove the temporary train plan (and the checkpoint dir, if this run made it and it stayed empty)."""
        if getattr(self, "plan_dir", None) is not None:
            shutil.rmtree(self.plan_dir, ignore_errors=True)
            self.plan_dir = None
        if self.created and self.ckpt.root.is_dir() and not any(self.ckpt.root.iterdir()):
            self.ckpt.root.rmdir()

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> Path:
        """Run to the last step, evaluating and saving on the way; returns the final checkpoint."""
        from tqdm import tqdm

        a = self.args
        metrics = self._open_metrics()
        start = time.perf_counter()
        last = None
        try:
            with tqdm(total=self.total, initial=self.step, unit="step", desc="train", disable=not self.progress,
                      dynamic_ncols=True) as bar:
                while self.step < self.total:
                    t0 = time.perf_counter()
                    rec = self.step_once()
                    dt = time.perf_counter() - t0
                    rec = {"step": self.step, **rec, "tokens_per_s": rec["tokens"] / dt,
                           "elapsed": self.elapsed0 + time.perf_counter() - start}
                    _write(metrics, rec)
                    bar.set_postfix_str(f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} {rec['tokens_per_s']:.0f} tok/s")
                    bar.update(1)
                    final = self.step == self.total
                    if self.eval_batches and ((a.eval_every and self.step % a.eval_every == 0) or final):
                        ev = self.evaluate()
                        ev = {"step": self.step, **ev, "elapsed": self.elapsed0 + time.perf_counter() - start}
                        _write(metrics, ev)
                        self.log(f"step {self.step}: eval loss {ev['eval_loss']:.4f}")
                    if self.step % a.save_every == 0 or final:
                        last = self._save(rec["elapsed"], rec["loss"])
                        self.log(f"saved {last}")
        finally:
            metrics.close()
            self.close()
        return last

    def step_once(self) -> dict:
        """One optimizer step on the next batch (no metrics, evaluation or checkpoint): {loss, lr,
        grad_norm, tokens}. train() calls it; so does tools/bench_train.py."""
        rec = self._optimizer_step()
        self.step += 1
        return rec

    def _feeds(self, b: Batch, scale: np.float32, micro: int | None = None) -> dict[str, np.ndarray]:
        """A micro-batch's feeds; `micro` (its index in the step) for the entries that train: with
        LoRA dropout, their masks' key."""
        feeds = {**b.feeds(), "loss_scale": np.asarray(scale, np.float32)}
        if micro is not None and self.lora and self.lora.dropout > 0:
            feeds[DROPOUT_KEY] = dropout_key(self.args.seed, self.step, micro)
        return feeds

    def _optimizer_step(self) -> dict:
        batches = [self.loader.next_batch() for _ in range(self.args.grad_accumulation_steps)]
        scale = np.float32(1.0 / max(1, sum(b.target_tokens for b in batches)))
        lr = self.schedule.lr(self.step)
        optim = {LR: np.asarray(lr, np.float32), STEP: np.asarray(self.step + 1, np.int32)}
        if "train_step" in self.entries:
            out = self.exe.run({**self._feeds(batches[0], scale, 0), **optim}, "train_step")
            loss = float(out["loss"])
        else:
            loss, acc = 0.0, {}
            for i, b in enumerate(batches):
                out = self.exe.run(self._feeds(b, scale, i), "train_grad")
                loss += float(out["loss"])
                for k, g in out.items():
                    if k.startswith("grad."):
                        if k in acc:
                            acc[k] += g
                        else:
                            acc[k] = np.array(g, np.float32, copy=True)
            out = self.exe.run({**acc, **optim}, "apply_update")
        if not math.isfinite(loss):
            raise ReftError(f"step {self.step + 1}: the loss is {loss} (lower --learning-rate or set --max-grad-norm)")
        return {"loss": loss, "lr": lr, "grad_norm": math.sqrt(float(out[NORM])),
                "tokens": sum(b.tokens for b in batches)}

    def evaluate(self) -> dict:
        """Mean loss over every target token of the held-out examples."""
        batches = self.eval_batches
        scale = np.float32(1.0 / max(1, sum(b.target_tokens for b in batches)))
        loss = sum(float(self.exe.run(self._feeds(b, scale), "eval_loss")["loss"]) for b in batches)
        return {"eval_loss": loss, "eval_tokens": sum(b.target_tokens for b in batches)}

    # -- checkpoints and metrics -----------------------------------------------------------------
    def _save(self, elapsed: float, loss: float) -> Path:
        states = [s for n in self.trainable for s in state_names(n)]
        got = self.exe.read_weights(list(self.trainable) + states)
        state = TrainerState(self.step, self.identity, self.schedule.state_dict(), self.loader.state_dict(),
                             metrics={"elapsed": elapsed, "loss": loss}, optimizer={s: got[s] for s in states})
        if self.lora:
            spec = LoraSpec(self.lora.r, self.lora.alpha, self.lora.dropout, tuple(self.lora.targets),
                            str(Path(self.source.path).resolve()))
            tensors = {n: got[n] for n in self.trainable}

            def write(d: Path) -> None:
                write_lora_adapter(d, spec, tensors)
                self.tokenizer().save_to(d)     # the chat template trained with, for `reft export --merge`
            return self.ckpt.save(state, write)
        weights = _Merged(list(self.params), {n: got[n] for n in self.trainable}, self.source.weights)
        return self.ckpt.save(state, lambda d: write_hf_model(d, self.source.config, weights, self.tokenizer()))

    def tokenizer(self):
        """The model's tokenizer, carrying the --chat-template the run trained with."""
        tok = self.source.tokenizer
        if self.template is not None:
            tok = copy.copy(tok)
            tok.chat_template = self.template
        return tok

    def _open_metrics(self):
        path = self.ckpt.root / METRICS
        keep = []
        if path.is_file():   # drop what a run that went past this step (and was not saved) wrote
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        f = path.open("w", encoding="utf-8")
        f.write("".join(line + "\n" for line in keep) if self.step else "")
        f.flush()
        return f


class _Merged(Mapping):
    """The model's weights: trained tensors over the source checkpoint's (read lazily)."""

    def __init__(self, names: list[str], trained: dict, source):
        self.names, self.trained, self.source = names, trained, source

    def __getitem__(self, name):
        return self.trained[name] if name in self.trained else self.source[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


def dropout_key(seed: int, step: int, micro: int) -> np.ndarray:
    """The LoRA dropout key (int64[]) of micro-batch `micro` of optimizer step `step` (0-based):
    numpy's SeedSequence hash of the three, so it is the same in every run and resume."""
    state = np.random.SeedSequence([seed % 2**64, step, micro]).generate_state(1, np.uint64)
    return state.view(np.int64).reshape(())


def _write(f, rec: dict) -> None:
    f.write(json.dumps(rec) + "\n")
    f.flush()

