"""The web dashboard: static files shipped in the package, served at ``/`` of the API port.

No CDN and no build step: plain JS modules plus the vendored uPlot (``static/vendor``). The page
talks only to the JSON API with the token the user signs in with.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).with_name("static")
_HEADERS = {
    # Scripts only from this origin; uPlot sets element styles, hence style 'unsafe-inline'.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def dashboard(request: web.Request) -> web.FileResponse:
    """The web dashboard (sign in with a user or admin token)."""
    return web.FileResponse(STATIC / "index.html", headers=_HEADERS)


async def _static_headers(request: web.Request, response: web.StreamResponse) -> None:
    if request.path.startswith("/dashboard/"):
        response.headers.update(_HEADERS)


def setup(app: web.Application) -> None:
    app.router.add_get("/", dashboard)
    app.router.add_static("/dashboard/", STATIC, follow_symlinks=False)
    app.on_response_prepare.append(_static_headers)
