"""One FastAPI app: AUTOMATIC1111's API under /sdapi/v1 and the Gradio UI at /, both in front of
the one GenerationQueue, served by uvicorn."""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
from dataclasses import dataclass

from ..errors import InputError
from ..pipeline import Pipeline
from .worker import GenerationQueue, Limits

log = logging.getLogger("minisd")

MAX_API_BODY = 256 * 2**20  # bytes of JSON one API request may send

# Gradio reports usage to its makers unless told not to; a local server keeps to itself.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@dataclass
class ServerInfo:
    """What the API and the UI say about the server: its model and limits."""
    model_name: str
    model_path: str
    limits: Limits
    native_size: int


def create_app(generation: GenerationQueue, info: ServerInfo):
    import gradio as gr
    from fastapi import FastAPI

    from .a1111 import api_router
    from .ui import build_ui

    app = FastAPI(title="minisd", docs_url="/docs", redoc_url=None)
    app.include_router(api_router(generation, info))

    app.add_middleware(BodyLimit, limit=MAX_API_BODY)
    return gr.mount_gradio_app(app, build_ui(generation, info), path="/", footer_links=[])


def serve(pipe: Pipeline, model_path: str, host: str, port: int, limits: Limits) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM); the queue's running job finishes first."""
    import uvicorn

    check_port_free(host, port)
    started = time.perf_counter()
    generation = GenerationQueue(pipe, limits)
    info = ServerInfo(pipe.name, model_path, limits, pipe.unet.config.sample_size * pipe.vae.downscale_factor)
    app = create_app(generation, info)
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s: anyone who can reach this machine can use the model; there is no "
                    "login. Keep it on 127.0.0.1 unless that is what you want.", host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"minisd: serving {pipe.name} at http://{shown}:{port} (web UI at /, API at /sdapi/v1; "
          f"ready in {time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    try:
        server.run()
    finally:
        generation.close()


def check_port_free(host: str, port: int) -> None:
    """A clear error now, rather than uvicorn's after the model has loaded."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"--host: cannot serve on {host!r}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise InputError(f"--port: cannot listen on {host}:{port} ({e.strerror}); is another server "
                             "running there? Choose another with --port") from None


class BodyLimit:
    """Refuse an API request whose body is larger than any valid one (init images of at most 4x
    the largest size, in base64) before it is read: FastAPI reads a body whole. A plain ASGI
    middleware, so an endpoint still sees its client disconnect."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/sdapi/"):
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                from fastapi.responses import JSONResponse
                answer = JSONResponse({"error": "RequestTooLarge", "field": "body",
                                       "detail": f"body: {int(length)} bytes; this server takes at most {self.limit}"},
                                      status_code=413)
                return await answer(scope, receive, send)
        await self.app(scope, receive, send)
