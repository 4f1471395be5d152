"""`potstill serve MODEL_DIR`: load the model, bind the socket, run uvicorn.

The socket is bound before uvicorn starts and the bound address printed on one line (``--port 0`` picks a free
port, which is how the tests start a server), so a caller learns the port without racing for it.
"""
from __future__ import annotations

import logging
import socket
from pathlib import Path

log = logging.getLogger("potstill.serve")


def default_model_name(model_dir: str) -> str:
    if model_dir == "builtin":
        return "builtin"
    path = Path(model_dir).expanduser()
    return path.parent.name if path.name == "final" and path.parent.name else path.name  # a run's final/ → the run


def bind(host: str, port: int) -> socket.socket:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          device: str = "auto", dtype: str = "auto", max_logprobs: int = 20, announce=print) -> None:
    import uvicorn

    from potstill.generation.local import load_local_model
    from potstill.serving.app import build_app

    model, tokenizer = load_local_model(model_dir, device, dtype, key="model")
    name = model_name or default_model_name(model_dir)
    app = build_app(model, tokenizer, name, max_logprobs=max_logprobs)
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    announce(f"potstill serve: model {name!r} at http://{bound_host}:{bound_port}/v1 (Ctrl+C stops)")
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this address can use the model (no authentication)", host)
    uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=True)).run(sockets=[sock])
