"""`mixtral ui`: a gradio chat web app for a local model (in-process engine) or a remote server.

    mixtral ui                                          # the shipped model, in-process
    mixtral ui --model DIR                              # another local model
    mixtral ui --endpoint http://host:8080              # a TGI server (ours, TGI, or a Hub model id + --api-key)
    mixtral ui --openai-base-url http://host:8000/v1    # any OpenAI-compatible server

Layout: backends.py (where replies come from, settings cleaning, prompt fitting), app.py (the page),
experts.py (the routing heatmap), memory_view.py (the memory planner).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import MixtralError
from .backends import Backend, ChatSettings, LocalBackend, OpenAIBackend, TGIBackend

__all__ = ["Backend", "ChatSettings", "LocalBackend", "OpenAIBackend", "TGIBackend", "make_backend",
           "generation_defaults", "main"]


def generation_defaults(model_dir: Path | None) -> ChatSettings:
    """The chat tab's starting values: the model's generation_config.json where it says, else mixtral's."""
    defaults = ChatSettings()
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return defaults
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return defaults
    values = {key: cfg[key] for key in ("temperature", "top_p", "repetition_penalty", "max_new_tokens")
              if isinstance(cfg.get(key), (int, float)) and not isinstance(cfg.get(key), bool)}
    if cfg.get("do_sample") is False:
        values["temperature"] = 0.0
    from .backends import clean_settings

    settings, _ = clean_settings(**values, defaults=defaults)
    return settings


def _chat_tokenizer(model: str | None):
    """The tokenizer that renders chats for a TGI endpoint: --model's, else the shipped model's."""
    from ..loading import resolve_model
    from ..tokenizer import load_tokenizer

    model_dir = resolve_model(model)
    return load_tokenizer(model_dir), model_dir


def make_backend(args) -> Backend:
    """The backend the command line asks for (see the module docstring). Raises MixtralError."""
    api_key = getattr(args, "api_key", None)
    if args.endpoint and args.openai_base_url:
        raise MixtralError("give either --endpoint or --openai-base-url, not both")
    if args.endpoint:
        try:
            tokenizer, model_dir = _chat_tokenizer(args.model)
        except MixtralError as exc:
            raise MixtralError(f"--endpoint needs the model's tokenizer to build prompts: {exc}") from None
        backend = TGIBackend(args.endpoint, tokenizer, api_key or os.environ.get("HF_TOKEN"))
        backend.model_dir = model_dir
        return backend
    if args.openai_base_url:
        return OpenAIBackend(args.openai_base_url, api_key or os.environ.get("OPENAI_API_KEY"), args.openai_model)

    from ..engine import Engine
    from ..cli import model_options
    from ..loading import load, resolve_model

    model_dir = resolve_model(args.model)
    model, tokenizer = load(model_dir, **model_options(args))
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_total_tokens=args.max_total_tokens)
    return LocalBackend(engine, model_dir, model_dir.name)


def main(args) -> int:
    """`mixtral ui`: build the backend and the page, serve until interrupted."""
    from ..config import load_config
    from .app import build_app, launch

    backend = make_backend(args)
    models = {}
    if backend.model_dir is not None:
        try:
            models[f"{Path(backend.model_dir).name} (loaded)"] = load_config(backend.model_dir)
        except MixtralError:
            pass
    demo = build_app(backend, defaults=generation_defaults(backend.model_dir), feedback_path=args.feedback_file,
                     models=models)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mixtral: warning: listening on {args.host}: anyone who can reach this port can use the chat",
              file=sys.stderr)
    print(f"mixtral: web app on http://{args.host}:{args.port} (replies from {backend.label}; "
          f"likes/dislikes go to {Path(args.feedback_file).resolve()})", flush=True)
    try:
        launch(demo, args.host, args.port, block=True)
    finally:
        if backend.engine is not None:
            backend.engine.close()
    return 0
