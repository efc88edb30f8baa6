"""The review web application (Starlette): ``create_app`` wires the routes and the middleware.

Security model (each point has a test in tests/test_review_server.py):
- Nothing but the login page, the static UI files and the NiiVue bundle is served without a
  session: the API answers 401, pages redirect to /login.
- Sessions, CSRF tokens and login throttling: ``auth``.
- Roles and stages: ``policy`` decides (pure, tested without HTTP); ``routes`` asks it. The
  label store refuses any version after a confirmed one, and does so under its per-study lock,
  so a confirmed label stays read-only whatever requests race.
- Study ids are looked up in the batches' manifests (unknown -> 404); files are only ever the
  manifest's own files or the store's versions (``routes``).
- Uploads are bounded before reading and header-checked before any voxel is read (``upload``).

The modules: ``service`` (shared state, ``HTTPError``), ``policy``, ``auth``, ``upload``,
``assign``, ``dashboard``, ``routes``; this one only assembles them.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from metsflow.review_server.auth import SameOriginWrites
from metsflow.review_server.config import ReviewConfig
from metsflow.review_server.routes import routes
from metsflow.review_server.service import ReviewApp, json_response

# Where a worker process (``metsflow review serve --workers N``) finds its settings:
# ``ReviewConfig.to_json``, set by the command before uvicorn starts the workers.
CONFIG_ENV = "METSFLOW_REVIEW_CONFIG"

# Nothing but this server's own files runs or loads: no inline script or style, no eval, no
# plugins, no framing, forms post only here. NiiVue's needs are named: WebGL needs no CSP
# entry; its workers and the volumes it decodes use blob: URLs (worker-src, connect-src,
# img-src); its colour maps and fonts come as data: images. The browser tests
# (tests/test_review_browser.py) run under this policy and fail on any violation report.
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "connect-src 'self' blob: data:",
        "worker-src 'self' blob:",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    )
)


class SecurityHeaders:
    """Plain ASGI middleware (no request buffering): nosniff, no framing, same-origin referrer,
    and a strict Content-Security-Policy (``CSP``)."""

    HEADERS = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
        "Content-Security-Policy": CSP,
        "Cross-Origin-Opener-Policy": "same-origin",
    }

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in self.HEADERS.items():
                    headers.setdefault(key, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(config: ReviewConfig) -> Starlette:
    """The Starlette application serving ``config``'s batches (see module docstring)."""

    async def not_found(request: Request, exc) -> Response:
        if request.url.path.startswith("/api/"):
            return json_response(404, {"detail": "not found"})
        return PlainTextResponse("not found", status_code=404)

    application = Starlette(
        routes=routes(),
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(SameOriginWrites, secure=config.secure_cookies),
        ],
        exception_handlers={404: not_found},
    )
    application.state.review = ReviewApp(config)
    return application


def app_from_env() -> Starlette:
    """The application of one uvicorn worker process: ``create_app`` over the settings the
    ``review serve`` command put in ``$METSFLOW_REVIEW_CONFIG`` (uvicorn imports this factory by
    name in each worker, so nothing else reaches them)."""
    return create_app(ReviewConfig.from_json(os.environ[CONFIG_ENV]))
