"""What `reft train` needs besides the compiled train_step entry point.

  schedule.py      LRSchedule(kind, peak_lr, total_steps, warmup_steps, decay_frac): lr per step
  records.py       dataset files -> records named by file:line (DatasetError, --skip-bad-lines)
  sft.py           alpaca / messages records -> chat-template rendering with assistant-only loss
  data.py          load_datasets(["text@...", "alpaca@...", ...], tokenizer, ...) -> Dataset (examples, stats)
  loader.py        Loader: seeded, resumable order of micro-batches (Batch: input_ids, positions,
                   seq_ids, targets), split_eval
  checkpoint.py    HF-layout model folders, trainer state, CheckpointDir (atomic saves, save_total_limit)
  lora_adapter.py  PEFT LoRA adapters: write, read, merge
  options.py       TrainArgs (every `reft train` option), freeze layer choice, what a resume must match
  trainer.py       Trainer: compile the train plan, run steps (grad accumulation, eval, metrics.jsonl),
                   save and resume checkpoints
"""
