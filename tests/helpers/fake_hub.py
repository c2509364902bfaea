"""A Hugging Face Hub on 127.0.0.1 for the tests of runtime.hub: the routes `huggingface_hub`
reads (a repository's file tree, a file's metadata and its bytes, by ranges), served from files
in memory, with the Hub's error codes, so that the real library runs against it (HF_ENDPOINT).
It counts the bytes it sends, and can cut a file's transfer short once, as a dropped
connection would."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commit = COMMIT  # the main branch's commit; a test may move it
        self.sent = 0  # file bytes sent
        self.cut_after: int | None = None  # the next file transfer stops after this many bytes
        self.stall_after: int | None = None  # file transfers send this many bytes, then wait for `release`
        self.release = threading.Event()
        self.starts: list[int] = []  # the first byte of each file transfer asked for
        self.listing: tuple | None = None  # what the tree route answers instead, when set
        self.hang_listing = False  # the tree route answers nothing until `release`
        self.gated = False  # file routes answer 401 GatedRepo
        self.move_after: int | None = None  # after this many file transfers, main moves to another commit
        self.files_served: list[tuple[str, str]] = []  # (commit, path) of each file transfer
        self.lock = threading.Lock()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _error(self, status: int, code: str | None):
            body = json.dumps({"error": code or "error"}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, value):
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self._serve()

        def do_HEAD(self):
            self._serve()

        def _serve(self):
            path = unquote(urlparse(self.path).path)
            tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            repo = (tree or resolve).group(1) if (tree or resolve) else None
            if repo not in hub.repos:
                return self._error(404 if tree or resolve else 400, "RepoNotFound" if tree or resolve else None)
            files = hub.repos[repo]
            if tree:
                if hub.hang_listing:
                    hub.release.wait(60)
                    return self._error(500, None)
                if hub.listing is not None:  # a test's own answer: (status, headers, body)
                    status, headers, body = hub.listing
                    self.send_response(status)
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    return self.wfile.write(body)
                return self._json([{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest(),
                                    "lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 130}}
                                   for p, b in sorted(files.items())])
            name = resolve.group(3)
            if hub.gated:
                return self._error(401, "GatedRepo")
            if name not in files:
                return self._error(404, "EntryNotFound")
            data = files[name]
            rev = resolve.group(2)  # a commit asked for by its hash is that commit (its files: today's)
            commit = rev if re.fullmatch(r"[0-9a-f]{40}", rev) else hub.commit
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if m:
                start = int(m.group(1))
            body = data[start:int(m.group(2)) + 1] if m and m.group(2) else data[start:]
            self.send_response(206 if m else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(body)))
            if m:
                self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            hub.starts.append(start)
            hub.files_served.append((commit, name))
            if hub.move_after is not None and len(hub.files_served) >= hub.move_after:
                hub.commit = "9" * 40  # a commit lands (a README edited, say)
            if hub.stall_after is not None:  # a transfer that hangs (the client is stopped meanwhile)
                self.wfile.write(body[:hub.stall_after])
                self.wfile.flush()
                hub.sent += min(hub.stall_after, len(body))
                hub.release.wait(60)
                self.close_connection = True
                return
            with hub.lock:
                cut, hub.cut_after = hub.cut_after, None
            if cut is not None:  # a dropped connection: part of the bytes, then nothing
                self.wfile.write(body[:cut])
                self.wfile.flush()
                hub.sent += min(cut, len(body))
                self.close_connection = True
                return
            self.wfile.write(body)
            hub.sent += len(body)

    return Handler


@contextlib.contextmanager
def fake_hub(repos: dict[str, dict[str, bytes]]):
    """(hub, its address) while the block runs."""
    hub = FakeHub(repos)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
