"""The chat page `stepstream serve` answers at its address, as llama-server serves its web UI:
GET / (runtime/server/webui/index.html), and its style, its script and the script's logic
(page.css, page.js, chat.js) under /webui/. The page talks to the server's own
/v1/chat/completions, streaming, with the key its user enters (the page itself needs none, as
llama-server's); the conversation stays in the browser. `--no-webui` turns it off
(llama-server's flag)."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import Response

WEBUI = Path(__file__).with_name("webui")
# the page runs its own files alone (no inline script or style: an injected one would not run),
# talks to its own address alone, and may not be framed by another site
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Content-Security-Policy": CSP}
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/webui/page.css": ("page.css", "text/css; charset=utf-8"),
         "/webui/page.js": ("page.js", "text/javascript; charset=utf-8"),
         "/webui/chat.js": ("chat.js", "text/javascript; charset=utf-8")}


def add_webui_routes(app) -> None:
    """The page's routes; its files are read now, so that a missing one stops the server at its start."""
    for path, (name, media) in FILES.items():
        content = (WEBUI / name).read_bytes()

        async def serve(content=content, media=media):
            return Response(content, media_type=media, headers=HEADERS)

        app.api_route(path, methods=["GET", "HEAD"], include_in_schema=False)(serve)
