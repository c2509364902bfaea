"""While the model loads: every request on the server's socket answered 503 "loading" at once.

`serve` listens before it loads the model, so that a taken port fails fast; until the load and
the kernels' warm-up are done (seconds, or a minute of compiling on a first run), a client or
a load balancer asking /health would otherwise wait on a socket nobody accepts from. As
llama-server does, they get 503 and Retry-After, /health {"status": "loading"}; then the real
server takes the same socket over.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


# what a browser opening the chat page meanwhile shows: it asks again each second
LOADING_PAGE = (b'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="1">'
                b"<title>stepstream: loading</title></head><body><p>The model is loading (the first run compiles its "
                b"kernels, up to a minute); this page opens by itself when it is ready.</p></body></html>")


class _Loading(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        kind = "application/json"
        if path == "/health":
            data = json.dumps({"status": "loading"}).encode()
        elif path == "/" and self.command in ("GET", "HEAD"):  # the chat page's address: a page that waits
            data, kind = LOADING_PAGE, "text/html; charset=utf-8"
        else:
            data = json.dumps({"error": {"message": "the model is loading; try again shortly",
                                         "type": "unavailable_error", "param": None, "code": "model_loading"}}).encode()
        self.send_response(503)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", "1")
        self.send_header("Access-Control-Allow-Origin", "*")  # as the real server: a web page may see it load
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _answer

    def log_message(self, format, *args) -> None:  # quiet, as the real server's access log
        pass


class LoadingResponder:
    """Answers on `sock` (bound and listening) from a thread until `stop()`; the socket stays open."""

    def __init__(self, sock: socket.socket):
        self._server = HTTPServer(sock.getsockname()[:2], _Loading, bind_and_activate=False)
        self._server.socket = sock
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="stepstream-loading", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()  # the accept loop ends; the socket is the real server's now
        self._thread.join()
