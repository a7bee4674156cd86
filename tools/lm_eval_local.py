"""lm-evaluation-harness against `reft run PLAN --serve`, on a local multiple-choice task, checked
against the same task scored through Hugging Face transformers.

The Hub is unreachable here, so the task is built from local files: `reft_mc`, 64 four-way
multiple-choice questions written from templates below (capitals, opposites, sequences, ...),
scored by log-likelihood as hellaswag-style tasks are (`acc`: the choice with the highest summed
log-probability; `acc_norm`: per byte of the choice). lm-eval's `local-completions` model sends
each context + choice to /v1/completions with `echo: true, logprobs: 1` and reads the prompt
tokens' logprobs back (prompt scoring, docs/serving.md).

The reference: transformers loads the plan's source weights (an HF folder, float32), tokenizes
each pair the way lm-eval does (context, then the continuation's tokens split off the whole),
and scores them; both accuracies are printed with their difference, and the script fails if
they differ by more than one question or any choice's log-likelihood by more than 1e-3.

    pip install 'lm-eval[api]'          # in any environment; pass its python with --lm-eval-python
    python tools/lm_eval_local.py --plan plans/smollm2-f32 --hf .cache/bench/models/smollm2-135m/hf \\
        --lm-eval-python /path/to/venv/bin/python
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

TASK_YAML = """task: reft_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Canada", "Ottawa"), ("Greece", "Athens"),
            ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Ireland", "Dublin"), ("Austria", "Vienna"),
            ("Poland", "Warsaw"), ("Kenya", "Nairobi"), ("Peru", "Lima")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
             ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("old", "young"),
             ("hard", "soft"), ("high", "low"), ("strong", "weak"), ("rich", "poor"), ("wet", "dry"), ("day", "night")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
SOUNDS = [("cat", "meows"), ("dog", "barks"), ("cow", "moos"), ("duck", "quacks"), ("lion", "roars"),
          ("sheep", "bleats"), ("horse", "neighs"), ("owl", "hoots")]


def _item(context: str, right: str, wrong: list[str], k: int) -> dict:
    """Four choices with the right one at position k % 4 (deterministic, spread evenly)."""
    choices = list(wrong[:3])
    choices.insert(k % 4, right)
    return {"context": context, "choices": [" " + c for c in choices], "label": k % 4}


def build_items() -> list[dict]:
    items = []
    caps = [c for _, c in CAPITALS]
    for k, (country, cap) in enumerate(CAPITALS):
        items.append(_item(f"The capital of {country} is", cap, [c for c in caps[k + 1:] + caps[:k]][::5], k))
    opp = [o for _, o in OPPOSITES]
    for k, (w, o) in enumerate(OPPOSITES):
        items.append(_item(f"The opposite of {w} is", o, [x for x in opp[k + 1:] + opp[:k]][::4], k + 1))
    for k in range(16):
        seq = DAYS if k < 6 else MONTHS if k < 12 else NUMBERS
        i = k % 6 if k < 6 else (k - 6) if k < 12 else (k - 12) * 2
        nxt = seq[(i + 3) % len(seq)]
        others = [seq[(i + j) % len(seq)] for j in (5, 1, 6)]
        items.append(_item(", ".join(seq[i:i + 3]) + ",", nxt, others, k + 2))
    snd = [s for _, s in SOUNDS]
    for k in range(16):
        animal, sound = SOUNDS[k % len(SOUNDS)]
        article = "An" if animal[0] in "aeiou" else "A"
        items.append(_item(f"{article} {animal} usually", sound, [s for s in snd if s != sound][k % 5:][:3] or snd[:3],
                           k + 3))
    return items


def reference_scores(hf_dir: Path, items: list[dict]) -> list[list[float]]:
    """Summed log-likelihood of each choice given its context, by transformers (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for it in items:
        row = []
        for cont in it["choices"]:
            ctx_ids, cont_ids = encode_pair(tok, it["context"], cont)
            ids = torch.tensor([ctx_ids + cont_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            row.append(float(sum(logp[len(ctx_ids) - 1 + j, t] for j, t in enumerate(cont_ids))))
        out.append(row)
    return out


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's
    tokens are those of the whole after the context's (no special tokens, as local-completions)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return whole[:len(ctx)], whole[len(ctx):]


def accuracy(scores: list[list[float]], items: list[dict], norm: bool) -> float:
    right = 0
    for s, it in zip(scores, items):
        vals = [v / len(c.encode()) for v, c in zip(s, it["choices"])] if norm else s
        right += int(max(range(len(vals)), key=vals.__getitem__) == it["label"])
    return right / len(items)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, type=Path, help="a compiled plan of --hf's weights")
    ap.add_argument("--hf", required=True, type=Path, help="the HF folder the plan was compiled from (the reference)")
    ap.add_argument("--lm-eval-python", default=sys.executable, help="a python with lm-eval[api] installed")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    from server_util import free_port

    items = build_items()
    work = Path(tempfile.mkdtemp(prefix="reft-lm-eval-"))
    (work / "reft_mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (work / "reft_mc.yaml").write_text(TASK_YAML.format(data=work / "reft_mc.jsonl"))
    port = args.port or free_port()
    cmd = [sys.executable, "-m", "reft.cli.reft", "run", str(args.plan), "--serve", "--port", str(port),
           "--model-name", "reft"] + (["--threads", str(args.threads)] if args.threads else [])
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        t0 = time.perf_counter()
        model_args = (f"model=reft,base_url=http://127.0.0.1:{port}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={args.hf.resolve()},num_concurrent=4,max_retries=1,tokenized_requests=True")
        r = subprocess.run([args.lm_eval_python, "-m", "lm_eval", "--model", "local-completions", "--model_args",
                            model_args, "--include_path", str(work), "--tasks", "reft_mc", "--output_path",
                            str(work / "out"), "--log_samples"], capture_output=True, text=True)
        lm_s = time.perf_counter() - t0
    finally:
        server.terminate()
        server.wait()
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
        return 1
    results = json.loads(next((work / "out").rglob("results_*.json")).read_text())["results"]["reft_mc"]
    samples = [json.loads(line) for f in (work / "out").rglob("samples_reft_mc_*.jsonl") for line in f.open()]
    samples.sort(key=lambda s: s["doc_id"])
    served = [[float(x[0][0]) for x in s["resps"]] for s in samples]
    ref = reference_scores(args.hf, items)
    diff = max(abs(a - b) for sa, sb in zip(served, ref) for a, b in zip(sa, sb))
    rows = [("acc", results["acc,none"], accuracy(ref, items, False)),
            ("acc_norm", results["acc_norm,none"], accuracy(ref, items, True))]
    print(f"reft_mc: {len(items)} questions, lm-eval local-completions against reft ({lm_s:.1f} s)")
    print("| metric | lm-eval via reft | transformers | difference |\n|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:.4f} | {b:.4f} | {a - b:+.4f} |")
    print(f"largest log-likelihood difference over {sum(map(len, ref))} choices: {diff:.2e}")
    ok = diff <= 1e-3 and all(abs(a - b) <= 1 / len(items) + 1e-9 for _, a, b in rows)
    print("OK" if ok else "MISMATCH")
    return 0 if ok and not math.isnan(diff) else 1


if __name__ == "__main__":
    sys.exit(main())
