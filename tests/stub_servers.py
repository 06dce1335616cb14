"""Loopback STUB servers for the served backends' protocol tests: not the real servers.

:class:`StubServer` answers ``POST`` requests on a free 127.0.0.1 port with whatever its ``handler`` says,
and records every request. The tests write handlers from the servers' documented APIs (OpenAI's chat
completions, Ollama's ``/api/chat``) to check request formats, retries and error handling; the real
OpenAI-compatible server is ``transformers serve`` (``tests/test_backends_serve.py``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the stub answers: a status and a JSON body, or ``drop`` (close the connection without an answer)."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: Any


class StubServer:
    """``with StubServer(handler) as stub:`` serves ``handler(request, number) -> Reply`` on ``stub.url``."""

    def __init__(self, handler: Callable[[Request, int], Reply]):
        self.handler = handler
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = Request(self.path, dict(self.headers), json.loads(raw or b"null"))
                with stub._lock:
                    stub.requests.append(request)
                    number = len(stub.requests)
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    reply = stub.handler(request, number)
                    time.sleep(reply.delay)
                    if reply.drop:
                        self.close_connection = True
                        return
                    payload = json.dumps(reply.body).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test): nothing to answer any more
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat_answer(content: str) -> dict[str, Any]:
    """An OpenAI chat-completions answer holding ``content``."""
    return {"id": "stub", "object": "chat.completion", "model": "stub",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}


def ollama_answer(content: str, model: str = "llava:7b") -> dict[str, Any]:
    """An Ollama ``/api/chat`` answer (``stream: false``) holding ``content``, as its API docs show it."""
    return {"model": model, "created_at": "2024-01-01T00:00:00Z", "message": {"role": "assistant", "content": content},
            "done_reason": "stop", "done": True, "total_duration": 1, "eval_count": 1}
