"""The HTTP servers of a rehearsal cloud: each answers on 127.0.0.1 at a free
port, on a thread of its own, and appends every request it serves to one
journal (`requests.jsonl`: one JSON object a line, with `time`, `from`,
`method`, `path`, `query`, `body`), so that tests can assert on what gcloud,
ssh's workers and the slice's agent sent.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class Journal:
    """requests.jsonl, appended to by every server of the rehearsal."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.entries: list[dict] = []

    def record(self, entry: dict) -> None:
        with self.lock:
            self.entries.append(entry)
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")


class Answer(Exception):
    """Raised by a handler to answer at once: an error in the Google API
    shape ({"error": {"code", "message", "status"}}), or any status."""

    def __init__(self, code: int, status: str, message: str):
        super().__init__(message)
        self.code, self.status = code, status

    def body(self) -> dict:
        return {
            "error": {"code": self.code, "message": str(self), "status": self.status}
        }


class Server(ThreadingHTTPServer):
    """Calls `answer(request) -> (code, headers, bytes)`; `who(request)` names
    the caller in the journal."""

    daemon_threads = True

    def __init__(self, journal: Journal):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.journal = journal
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self.thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()

    def who(self, request: Request) -> dict:
        """Who sent it, for the journal: at least {"from": ...}."""
        return {"from": "client"}

    def answer(self, request: Request) -> tuple[int, dict, bytes]:
        raise Answer(404, "NOT_FOUND", f"nothing at {request.path}")


class Request:
    """One request, parsed."""

    def __init__(self, method, path, query, headers, raw):
        self.method, self.path, self.query = method, path, query
        self.headers, self.raw = headers, raw

    @property
    def token(self) -> str:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ").strip()

    def json(self):
        try:
            return json.loads(self.raw) if self.raw else None
        except ValueError:
            return None

    def arg(self, name: str, default: str = "") -> str:
        return self.query.get(name, default)


def json_answer(value, code: int = 200) -> tuple[int, dict, bytes]:
    return (
        code,
        {"Content-Type": "application/json; charset=UTF-8"},
        json.dumps(value).encode(),
    )


class _Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the journal is the log
        pass

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        request = Request(method, url.path, query, self.headers, raw)
        entry = {
            "time": time.time(),
            **self.server.who(request),
            "method": method,
            "path": url.path,
            "query": query,
            "authorization": self.headers.get("Authorization", ""),
            "agent": self.headers.get("User-Agent", "").split(" ")[0][:60],
        }
        body = request.json()
        entry["body"] = body if body is not None or not raw else f"<{len(raw)} bytes>"
        self.server.journal.record(entry)
        try:
            code, headers, data = self.server.answer(request)
        except Answer as error:
            code, headers, data = json_answer(error.body(), error.code)
        self.send_response(code)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's names)
        self._serve("GET")

    def do_HEAD(self):  # noqa: N802
        self._serve("HEAD")

    def do_POST(self):  # noqa: N802
        self._serve("POST")

    def do_PUT(self):  # noqa: N802
        self._serve("PUT")

    def do_PATCH(self):  # noqa: N802
        self._serve("PATCH")

    def do_DELETE(self):  # noqa: N802
        self._serve("DELETE")
