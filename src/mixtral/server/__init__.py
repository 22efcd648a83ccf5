"""HTTP serving: the TGI and OpenAI protocols over one continuously batching `Engine`.

`create_app(engine, model_id, ...)` builds the ASGI app; `serve(args)` is `mixtral serve`.
"""

from .app import create_app, serve

__all__ = ["create_app", "serve"]
