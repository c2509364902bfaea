"""The chat page `stepstream serve` answers at its address, as llama-server serves its web UI:
GET / (the page, runtime/server/webui/index.html) and GET /webui/chat.js (its logic). The page
talks to the server's own /v1/chat/completions, streaming, with the key its user enters (the
page itself needs none, as llama-server's); the conversation stays in the browser. `--no-webui`
turns it off (llama-server's flag)."""

from __future__ import annotations

from pathlib import Path

from fastapi.responses import Response

WEBUI = Path(__file__).with_name("webui")
# the page loads nothing from elsewhere and may not be framed by another site
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                      "style-src 'unsafe-inline'; frame-ancestors 'none'"}
FILES = {"/": ("index.html", "text/html; charset=utf-8"),
         "/webui/chat.js": ("chat.js", "text/javascript; charset=utf-8")}


def add_webui_routes(app) -> None:
    """The page's routes; its files are read now, so that a missing one stops the server at its start."""
    for path, (name, media) in FILES.items():
        content = (WEBUI / name).read_bytes()

        async def serve(content=content, media=media):
            return Response(content, media_type=media, headers=HEADERS)

        app.get(path, include_in_schema=False)(serve)
