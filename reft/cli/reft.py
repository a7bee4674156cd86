"""reft: the runtime CLI (generate, chat, perplexity)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..backends.base import BackendOptions
from ..backends.registry import names as backend_names
from .common import friendly_errors, show_progress


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reft")
def main():
    """reft — run compiled plans (make one with `reftc compile`).

    \b
    Examples:
      reft run plan/ --prompt "Once upon a time" --temperature 0
      reft run plan/ --chat
      reft run plan/ --serve --port 8000
      reft perplexity plan/ -f text.txt
      reft train --model MODEL --datasets alpaca@data.json --checkpoint-dir ckpt/
      reft export ckpt/checkpoint-300 --merge -o merged/
    """


def _sampling(plan, temperature, top_p, top_k, min_p, seed):
    from ..frontends.config import load_generation_config
    from ..runtime.sampler import SamplingParams

    gen = load_generation_config(plan.path / "tokenizer")
    pick = lambda given, key, default: given if given is not None else gen.get(key, default)  # noqa: E731
    return SamplingParams(temperature=float(pick(temperature, "temperature", 0.8)),
                          top_p=float(pick(top_p, "top_p", 0.95)), top_k=int(pick(top_k, "top_k", 40)),
                          min_p=float(min_p), seed=seed)


def _grammar_spec(grammar_file: Path | None, json_schema: Path | None):
    """The GrammarSpec of --grammar-file (GBNF or Lark) or --json-schema, or None; ReftError naming
    the file when it cannot be read (the grammar engine checks the rest when it compiles it)."""
    import json as _json

    from ..errors import ReftError
    from ..runtime.grammar import GrammarSpec

    if grammar_file is not None and json_schema is not None:
        raise ReftError("give at most one of --grammar-file and --json-schema")
    path = grammar_file or json_schema
    if path is None:
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReftError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
    if json_schema is not None:
        try:
            spec = GrammarSpec("json_schema", _json.loads(text), str(path))
        except ValueError as e:
            raise ReftError(f"{path}: not valid JSON ({e})") from None
    else:
        spec = GrammarSpec("grammar", text, str(path))
    return spec


def _stream(serving, prompt_ids, max_tokens, sampling, stops, special, out, grammar=None, adapter=None) -> int:
    """Generate one request on the serving engine (as a served request would be) and write its text
    to `out` as it is produced; returns the number of tokens."""
    from ..runtime.generate import stream
    from ..runtime.serving import Request

    req = Request("cli", list(prompt_ids), max_tokens, sampling, stop=tuple(stops),
                  skip_special_tokens=not special, grammar=grammar, adapter=adapter)
    n = 0
    for o in stream(serving, req):
        out.write(o.text)
        out.flush()
        n = o.completion_tokens
    return n


def _loras(specs) -> dict[str, Path]:
    """--lora NAME=DIR options -> {name: folder}; a malformed or repeated name is one error line."""
    from ..errors import ReftError

    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ReftError(f"--lora {spec!r}: give NAME=ADAPTER_DIR")
        if name in out:
            raise ReftError(f"--lora: the name {name!r} is given twice")
        out[name] = Path(path)
    return out


SAMPLING_OPTIONS = [
    click.option("--max-tokens", "-n", default=256, show_default=True, type=click.IntRange(1),
                 help="Most tokens to generate."),
    click.option("--temperature", type=click.FloatRange(0), default=None,
                 help="Sampling temperature; 0 = greedy. [default: generation_config.json, else 0.8]"),
    click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
                 help="Nucleus sampling mass. [default: generation_config.json, else 0.95]"),
    click.option("--top-k", type=click.IntRange(0), default=None,
                 help="Sample among the k most likely tokens; 0 = off. [default: generation_config.json, else 40]"),
    click.option("--min-p", type=click.FloatRange(0, 1), default=0.0, show_default=True,
                 help="Drop tokens below min_p x the top token's probability."),
    click.option("--seed", type=int, default=None, help="Random seed for reproducible sampling."),
    click.option("--stop", multiple=True, help="Stop when this text appears (repeatable); it is not printed."),
]


SPEC_OPTIONS = [
    click.option("--draft", "draft_plan", type=click.Path(path_type=Path), default=None, metavar="PLAN",
                 help="Speculative decoding with a draft model: a smaller or more heavily quantized plan with the same"
                      " tokenizer proposes tokens that PLAN verifies in one step. Output is unchanged."),
    click.option("--spec-ngram", is_flag=True,
                 help="Speculative decoding by prompt lookup: propose the tokens that followed the latest earlier"
                      " occurrence of the last few tokens (no second model; best when the answer copies the prompt)."),
    click.option("--spec-tokens", default=4, show_default=True, type=click.IntRange(1, 16),
                 help="--draft/--spec-ngram: most draft tokens verified per sequence and step."),
]


DEVICE_OPTION = click.option(
    "--device", default=None, type=click.Choice(backend_names()),
    help="Where to run a plan compiled for several devices (reftc compile --backend cpu,cuda): cpu or cuda."
         " [default: the plan's first backend]")


def spec_options(fn):
    for opt in reversed(SPEC_OPTIONS):
        fn = opt(fn)
    return fn


def sampling_options(fn):
    for opt in reversed(SAMPLING_OPTIONS):
        fn = opt(fn)
    return fn


SERVE_OPTIONS = [
    click.option("--serve", is_flag=True,
                 help="Serve PLAN over HTTP: an OpenAI-compatible API under /v1 and a chat page at /."),
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="--serve: address to listen on (0.0.0.0 makes the server reachable from other machines)."),
    click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
                 help="--serve: TCP port to listen on."),
    click.option("--api-key", default=None, envvar="REFT_API_KEY",
                 help="--serve: require `Authorization: Bearer KEY` on every route except /health and the chat"
                      " page's HTML at / (and /metrics with --metrics-public). [env: REFT_API_KEY]"),
    click.option("--metrics-public", is_flag=True,
                 help="--serve: with --api-key, let /metrics be scraped without the key."),
    click.option("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                 help="--serve: host names (any port) that the Host and Origin headers may carry besides localhost,"
                      " 127.0.0.1 and ::1; others get 421 (Host) or 403 (Origin). Checked when --host is a loopback"
                      " address or this is given; '*' turns the check off."),
    click.option("--max-request-bytes", default=None, metavar="SIZE",
                 help="--serve: largest request body (4MiB, 500kB, 1048576); larger ones get 413 before they are"
                      " read. [default: 4MiB]"),
    click.option("--max-prompt-chars", default=None, type=click.IntRange(1), metavar="N",
                 help="--serve: longest prompt text (in characters, all messages together) accepted for"
                      " tokenizing; longer is a 400. [default: 32 x the plan's context length]"),
    click.option("--kv-cache-memory", default=None, metavar="SIZE",
                 help="--serve: memory for the KV-cache page pool, as a size (2GiB, 512MB) or a fraction of"
                      " free memory (0.25): host memory for a cpu plan, GPU memory after the weights for a cuda plan."
                      " [default: room for --max-num-seqs full contexts, at most 0.2]"),
    click.option("--max-num-seqs", default=32, show_default=True, type=click.IntRange(1),
                 help="--serve: most sequences decoded together in one step."),
    click.option("--max-batch-tokens", default=None, type=click.IntRange(1),
                 help="--serve: most tokens per step; longer prompts are processed in pieces of this size"
                      " between decode steps. [default and maximum: the plan's max_batch_tokens]"),
    click.option("--max-queue", default=256, show_default=True, type=click.IntRange(0),
                 help="--serve: sequences that may wait for a slot beyond --max-num-seqs; past that,"
                      " requests get HTTP 429."),
    click.option("--model-name", default=None,
                 help="--serve: the model id clients send and /v1/models lists. [default: the plan directory's name]"),
    click.option("--no-prefix-caching", is_flag=True,
                 help="--serve: do not share the KV pages of prompt prefixes between requests."),
    click.option("--reproducible", type=click.Choice(["seeded", "all", "off"]), default="seeded", show_default=True,
                 help="--serve: which requests get results that do not depend on the batch they share or on the"
                      " prefix cache (cpu plans): those with a seed, all, or none. Steps holding such a request run"
                      " the batch-invariant kernels, which process prompts more slowly."),
    click.option("--lora", "loras", multiple=True, metavar="NAME=DIR",
                 help="Load the PEFT LoRA adapter in DIR as NAME (repeatable; the plan needs `reftc compile"
                      " --max-loras`). --serve: a request whose `model` is NAME runs through it, others through the"
                      " base model, in the same batches. --prompt/--chat: give one, and it is used."),
]


def serve_options(fn):
    for opt in reversed(SERVE_OPTIONS):
        fn = opt(fn)
    return fn


EMBED_OPTIONS = [
    click.option("--pooling", type=click.Choice(["last", "mean", "cls"]), default=None,
                 help="--serve of an embed plan (reftc compile --task embed): how /v1/embeddings pools an input's"
                      " hidden states: the last token's (decoder embedders such as Qwen3-Embedding), the mean over"
                      " tokens, or the first token's. [default: last]"),
    click.option("--no-normalize", is_flag=True,
                 help="--serve of an embed plan: return embeddings as pooled, without L2 normalisation."),
    click.option("--matryoshka", is_flag=True,
                 help="--serve of an embed plan: honour the `dimensions` field of /v1/embeddings (keep the first N"
                      " dimensions, then normalise); only for models trained for such truncation (Matryoshka), as"
                      " Qwen3-Embedding is. Without it only the full size is accepted."),
]


def embed_options(fn):
    for opt in reversed(EMBED_OPTIONS):
        fn = opt(fn)
    return fn


def _embedding(pooling, no_normalize, matryoshka):
    """The EmbeddingOptions the embed options ask for, or None when none is given."""
    from ..runtime.embed import EmbeddingOptions

    if pooling is None and not no_normalize and not matryoshka:
        return None
    return EmbeddingOptions(pooling or "last", not no_normalize, matryoshka)


@main.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--prompt", "-p", default=None, help="Text to continue; the continuation streams to stdout.")
@click.option("--chat", is_flag=True, help="Interactive chat using the model's chat template (Ctrl-D to quit).")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A Jinja chat template file to use instead of the model's own (--chat and --serve).")
@click.option("--threads", "-t", type=click.IntRange(1), default=None,
              help="CPU threads for the cpu backend. [default: physical cores]")
@click.option("--special", is_flag=True,
              help="--prompt/--chat: print the special tokens the model generates (left out by default);"
                   " the end-of-sequence token that stops generation is never printed.")
@click.option("--grammar-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--prompt/--chat: constrain the output to this grammar (llama.cpp GBNF or Lark); generation"
                   " stops when it is complete.")
@click.option("--json-schema", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--prompt/--chat: constrain the output to JSON matching this JSON schema file.")
@DEVICE_OPTION
@sampling_options
@spec_options
@serve_options
@embed_options
@friendly_errors
def run(plan, prompt, chat, system, chat_template, device, max_tokens, temperature, top_p, top_k, min_p, seed, stop,
        special, grammar_file, json_schema, threads, serve, host, port, api_key, metrics_public, allowed_hosts,
        max_request_bytes, max_prompt_chars, kv_cache_memory, max_num_seqs, max_batch_tokens, max_queue, model_name,
        no_prefix_caching, reproducible, loras, draft_plan, spec_ngram, spec_tokens, pooling, no_normalize,
        matryoshka):
    """Generate text with PLAN: continue --prompt, chat with --chat, or --serve it over HTTP.

    An embed plan (reftc compile --task embed) is served only: --serve answers POST /v1/embeddings.

    The sampling options apply to --prompt and --chat; served requests carry their own
    (fields the request leaves out come from the plan's generation_config.json, then OpenAI's
    defaults).
    """
    from ..errors import ReftError
    from ..runtime.engine import Engine
    from ..runtime.plan import device_plan

    plan = device_plan(plan, device)
    if sum((prompt is not None, chat, serve)) != 1:
        raise ReftError("give exactly one of --prompt TEXT, --chat or --serve")
    if serve and (grammar_file or json_schema):
        raise ReftError("--grammar-file and --json-schema apply to --prompt and --chat; served requests carry"
                        " their own (response_format, grammar, json_schema)")
    if serve:
        from ..server.serve import serve as run_server

        return run_server(plan, host=host, port=port, api_key=api_key, kv_cache_memory=kv_cache_memory,
                          max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens, max_queue=max_queue,
                          chat_template=chat_template, backend_options=BackendOptions(threads=threads),
                          model_name=model_name,
                          prefix_caching=not no_prefix_caching, metrics_public=metrics_public,
                          max_request_bytes=max_request_bytes, max_prompt_chars=max_prompt_chars,
                          allowed_hosts=allowed_hosts, draft_plan=draft_plan, spec_ngram=spec_ngram,
                          spec_tokens=spec_tokens, embedding=_embedding(pooling, no_normalize, matryoshka),
                          loras=_loras(loras), reproducible=reproducible)
    if _embedding(pooling, no_normalize, matryoshka) is not None:
        raise ReftError("--pooling, --no-normalize and --matryoshka apply to --serve of an embed plan")
    from ..runtime.lora import load_adapters
    from ..runtime.serving import ServingEngine
    from ..runtime.speculative import make_drafter

    spec = _grammar_spec(grammar_file, json_schema)
    options = BackendOptions(threads=threads)
    engine = Engine.load(plan, backend_options=options)
    adapters = load_adapters(engine, _loras(loras))
    if len(adapters) > 1:
        raise ReftError("--prompt and --chat run one LoRA adapter; give --lora once")
    adapter = next(iter(adapters), None)
    drafter = make_drafter(draft_plan, spec_ngram, spec_tokens, engine, options)
    serving = ServingEngine(engine, max_num_seqs=1, drafter=drafter, spec_tokens=spec_tokens,
                            reproducible="off")   # one sequence: nothing else shares its steps
    sampling = _sampling(engine.plan, temperature, top_p, top_k, min_p, seed)
    grammar = serving.grammars.compile(spec) if spec is not None else None   # GrammarError: one line
    tok = engine.tokenizer
    if prompt is not None:
        ids = tok.encode(prompt)
        sys.stdout.write(prompt)
        _stream(serving, ids, max_tokens, sampling, stop, special, sys.stdout, grammar, adapter)
        sys.stdout.write("\n")
        return
    template = chat_template.read_text() if chat_template else None
    messages = [{"role": "system", "content": system}] if system else []
    tok.render_chat(messages or [{"role": "user", "content": "hi"}], template=template)  # fails early if none
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo("> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.encode(tok.render_chat(messages, add_generation_prompt=True, template=template),
                         add_special_tokens=False)
        reply = _Capture(sys.stdout)
        _stream(serving, ids, max_tokens, sampling, stop, special, reply, grammar, adapter)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": reply.text.strip()})


class _Capture:
    """Writes through to a stream and keeps the text."""

    def __init__(self, out):
        self.out, self.text = out, ""

    def write(self, s):
        self.text += s
        self.out.write(s)

    def flush(self):
        self.out.flush()


@main.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("-f", "--file", "text_file", required=True, type=click.Path(path_type=Path),
              help="UTF-8 text file to score.")
@click.option("--ctx", type=click.IntRange(2), default=None,
              help="Window size in tokens. [default: the model's context length]")
@click.option("--threads", "-t", type=click.IntRange(1), default=None,
              help="CPU threads for the cpu backend. [default: physical cores]")
@DEVICE_OPTION
@friendly_errors
def perplexity(plan, text_file, ctx, threads, device):
    """Perplexity of PLAN's model over a text file.

    The file is tokenized once (with BOS if the tokenizer adds one) and cut into consecutive
    windows of --ctx tokens, each evaluated independently on a fresh KV cache. In each window
    every token except the first is scored, predicted from the tokens before it in that window.
    Prints the perplexity exp(mean negative log-likelihood) and the number of scored tokens.
    """
    from ..errors import ReftError
    from ..progress import progress_bar
    from ..runtime.engine import Engine
    from ..runtime.perplexity import perplexity as run_ppl
    from ..runtime.plan import device_plan

    plan = device_plan(plan, device)
    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReftError(f"{text_file}: cannot read text ({e.__class__.__name__}: {e})") from None
    engine = Engine.load(plan, backend_options=BackendOptions(threads=threads))
    ids = engine.tokenizer.encode(text)
    with progress_bar(len(ids), "perplexity", enabled=show_progress(), unit="tok") as bar:
        r = run_ppl(engine, ids, ctx, progress=bar.update)
    click.echo(f"perplexity {r.ppl:.4f}  (mean NLL {r.mean_nll:.6f} over {r.tokens_scored} tokens,"
               f" {r.windows} window{'s' if r.windows != 1 else ''})")


@main.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("-p", "--n-prompt", "prompt", default=512, show_default=True, type=click.IntRange(0),
              help="Prompt tokens processed in one step (the ppN test); 0 skips it.")
@click.option("-n", "--n-gen", "gen", default=128, show_default=True, type=click.IntRange(0),
              help="Tokens generated one step at a time from an empty cache (the tgN test); 0 skips it.")
@click.option("-r", "--repetitions", default=3, show_default=True, type=click.IntRange(1),
              help="Timed repetitions of each test, after one warm-up run.")
@click.option("--threads", "-t", type=click.IntRange(1), default=None,
              help="CPU threads. [default: physical cores]")
@click.option("--output", "-o", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True,
              help="A table like llama-bench's, or JSON records for scripts.")
@click.option("--reproducible", "bench_repro", is_flag=True,
              help="Time reproducible sequences: the batch-invariant kernels a seeded request gets from"
                   " `reft run --serve` (cpu plans).")
@spec_options
@click.option("--prompt", "spec_prompt", default=None,
              help="--draft/--spec-ngram: the text to decode from (drafts need real text, not random tokens).")
@click.option("--prompt-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--draft/--spec-ngram: read the prompt text from this file.")
@click.option("--chat", "as_chat", is_flag=True,
              help="--draft/--spec-ngram: send the prompt as a user message through the model's chat template.")
@DEVICE_OPTION
@friendly_errors
def bench(plan, prompt, gen, repetitions, threads, fmt, bench_repro, draft_plan, spec_ngram, spec_tokens,
          spec_prompt, prompt_file, as_chat, device):
    """Measure prompt processing and generation speed of PLAN (tokens/s, mean ± stddev).

    With --draft PLAN or --spec-ngram it measures speculative decoding instead: greedy decoding
    of --prompt (up to -n tokens) without and with the drafter, in the same run, with the
    speed-up, the draft acceptance rate and the mean accepted length.
    """
    import json as _json

    from ..errors import ReftError
    from ..runtime.bench import bench as run_bench
    from ..runtime.bench import format_table
    from ..runtime.engine import Engine
    from ..runtime.plan import device_plan

    plan = device_plan(plan, device)
    t0 = time.perf_counter()
    speculative = draft_plan is not None or spec_ngram
    options = BackendOptions(threads=threads)
    if speculative:
        return _bench_speculative(plan, options, gen, repetitions, fmt, draft_plan, spec_ngram, spec_tokens,
                                  spec_prompt, prompt_file, as_chat)
    if spec_prompt is not None or prompt_file is not None or as_chat:
        raise ReftError("--prompt, --prompt-file and --chat apply with --draft or --spec-ngram")
    engine = Engine.load(plan, backend_options=options, kv_tokens=prompt + gen + 16)
    load_s = time.perf_counter() - t0
    threads = getattr(engine.exe, "threads", None) or threads or 1   # what the backend runs on
    if prompt > engine.max_batch_tokens:
        raise ReftError(f"-p {prompt} exceeds the plan's max_batch_tokens {engine.max_batch_tokens}"
                        " (recompile with a larger --max-batch-tokens)")
    results = run_bench(engine, prompt, gen, repetitions, threads, load_s, reproducible=bench_repro)
    if fmt == "json":
        click.echo(_json.dumps([r.as_dict() for r in results], indent=2))
    else:
        click.echo(format_table(results))


def _bench_speculative(plan, options, gen, repetitions, fmt, draft_plan, spec_ngram, spec_tokens, text, prompt_file,
                       as_chat):
    import json as _json

    from ..errors import ReftError
    from ..runtime.bench import bench_speculative, format_spec
    from ..runtime.engine import Engine
    from ..runtime.speculative import make_drafter

    if (text is None) == (prompt_file is None):
        raise ReftError("--draft/--spec-ngram benchmarks need exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ReftError(f"{prompt_file}: cannot read ({e.__class__.__name__}: {e})") from None
    engine = Engine.load(plan, backend_options=options)
    tok = engine.tokenizer
    if as_chat:
        ids = tok.encode(tok.render_chat([{"role": "user", "content": text}]), add_special_tokens=False)
    else:
        ids = tok.encode(text)
    if len(ids) + gen > engine.context_length:
        raise ReftError(f"the prompt ({len(ids)} tokens) and -n {gen} exceed the context of {engine.context_length}")
    drafter = make_drafter(draft_plan, spec_ngram, spec_tokens, engine, options)
    r = bench_speculative(engine, drafter, ids, gen, repetitions, spec_tokens)
    click.echo(_json.dumps(r.as_dict(), indent=2) if fmt == "json" else format_spec(r))
    if not r.identical:
        raise ReftError("speculative decoding changed the greedy output (a bug: please report it)")


from .train import export, train  # noqa: E402  (their own module, on this group)

main.add_command(train)
main.add_command(export)

if __name__ == "__main__":
    main()
