"""Test helpers for `potstill serve`: the real app in an in-process uvicorn server, raw JSON requests, and an ASGI
middleware that delays or fails the first requests (to test a client's timeouts and retries)."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

import uvicorn

from potstill.serving.server import bind


@contextmanager
def running(app):
    """Serve ``app`` on a free 127.0.0.1 port in a thread; yields the base URL (``http://127.0.0.1:PORT``)."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def request(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a GET (body None) or POST."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


class Flaky:
    """ASGI middleware: of the requests to a completions endpoint (counted in ``calls``, with their Authorization
    headers in ``auth``), the first ``delay`` are held ``seconds`` (or until the client hangs up, when they never
    reach the app), then the first ``fail`` get HTTP ``status``."""

    def __init__(self, app, fail: int = 0, status: int = 500, delay: int = 0, seconds: float = 0.0):
        self.app, self.fail, self.status, self.delay, self.seconds = app, fail, status, delay, seconds
        self.calls, self.auth = 0, []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].endswith("completions"):
            self.calls += 1
            self.auth.append(dict(scope["headers"]).get(b"authorization", b"").decode())
            call = self.calls
            if call <= self.delay:
                received, hung_up = await _hold(receive, self.seconds)
                if hung_up:
                    return
                receive = _replay(received, receive)
            if call <= self.fail:
                body = json.dumps({"error": {"message": "injected failure", "type": "server_error", "code": None}})
                await send({"type": "http.response.start", "status": self.status,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body.encode()})
                return
        await self.app(scope, receive, send)


async def _hold(receive, seconds: float) -> tuple[list, bool]:
    """Read the request's messages for up to ``seconds``: (messages read, whether the client disconnected)."""
    received: list = []

    async def until_disconnect() -> None:
        while (message := await receive())["type"] != "http.disconnect":
            received.append(message)

    try:
        await asyncio.wait_for(until_disconnect(), seconds)
        return received, True
    except asyncio.TimeoutError:
        return received, False


def _replay(messages: list, receive):
    pending = list(messages)

    async def replayed():
        return pending.pop(0) if pending else await receive()

    return replayed
