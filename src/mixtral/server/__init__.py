"""HTTP serving: the TGI and OpenAI protocols over one continuously batching `Engine`.

`create_app(engine, model_id, ...)` builds the ASGI app; `run(engine, model_id, host, port, ...)` serves it with
uvicorn (`mixtral serve`). Needs the `serve` extra: `pip install 'mixtral[serve]'`.
"""

from .app import create_app, run

__all__ = ["create_app", "run"]
