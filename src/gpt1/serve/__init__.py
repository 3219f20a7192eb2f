"""`gpt1 serve`: an OpenAI-compatible HTTP API and a browser chat page for a model dir.

    from gpt1.serve import create_app, background_server
    app = create_app(gpt1.load("runs/chat"), api_key="sekrit")
    with background_server(app) as url: ...   # or `gpt1 serve --model runs/chat`

Needs the `serve` extra (FastAPI + uvicorn). Generation runs in `gpt1.inference.engine`.
"""

from gpt1.serve.app import create_app
from gpt1.serve.server import background_server, bind, serve

__all__ = ["background_server", "bind", "create_app", "serve"]
