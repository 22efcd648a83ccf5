"""The web app: a gradio chat page for a local model (in-process engine) or a remote server.

    run(LocalBackend(engine, model_dir), port=7860)                   # what `mixtral ui --model DIR` does
    run(TGIBackend("http://host:8080", tokenizer))                   # a TGI server (ours, TGI, a Hub model id)
    run(OpenAIBackend("http://host:8000/v1"))                         # any OpenAI-compatible server

Layout: backends.py (where replies come from, settings cleaning, prompt fitting), app.py (the page, its
starting settings), experts.py (the routing heatmap), memory_view.py (the memory planner). Needs the `ui`
extra: `pip install 'mixtral[ui]'`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import MixtralError
from .backends import Backend, ChatSettings, LocalBackend, OpenAIBackend, TGIBackend

__all__ = ["Backend", "ChatSettings", "LocalBackend", "OpenAIBackend", "TGIBackend", "run"]


def run(backend: Backend, host: str = "127.0.0.1", port: int = 7860,
        feedback_file: str | os.PathLike = "mixtral-feedback.jsonl", defaults: ChatSettings | None = None,
        allowed_hosts: tuple[str, ...] = ()) -> None:
    """Serve the page for `backend` on host:port until interrupted (`mixtral ui`).

    defaults: the chat settings it starts with (default: the model's generation_config.json where the backend
    has a model directory, else mixtral's). Likes and dislikes are appended to `feedback_file`. A request's Host
    header must name this server (IP addresses, localhost, `host`, `allowed_hosts`; "*" accepts any), and a
    POST must come from the app's own page (web_guard.py). A local backend's engine stays the caller's to close.
    """
    from ..config import load_config
    from .app import build_app, generation_defaults, launch

    models = {}
    if backend.model_dir is not None:
        try:
            models[f"{Path(backend.model_dir).name} (loaded)"] = load_config(backend.model_dir)
        except MixtralError:
            pass
    if defaults is None:
        defaults = generation_defaults(backend.model_dir)
    demo = build_app(backend, defaults=defaults, feedback_path=feedback_file, models=models)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mixtral: warning: listening on {host}: anyone who can reach this port can use the chat",
              file=sys.stderr)
    print(f"mixtral: web app on http://{host}:{port} (replies from {backend.label}; "
          f"likes/dislikes go to {Path(feedback_file).resolve()})", flush=True)
    launch(demo, host, port, block=True, allowed_hosts=allowed_hosts)
