"""Sessions, CSRF, login and logout, and the wrapper every JSON endpoint goes through.

- Sessions: a random id in an HttpOnly, SameSite=Strict cookie (Secure with
  ``secure_cookies``); only its SHA-256 is stored (``db``); a login always issues a fresh id
  and drops the one the client sent (no fixation).
- Every state-changing request must carry the session's CSRF token in ``X-CSRF-Token``.
- Login throttling: ``db.LOGIN_FAILURES_ALLOWED`` failures per user name and address within
  ``db.LOGIN_WINDOW_S`` answer 429; each attempt is reserved in the database before the
  password is checked (``db.begin_login``), so concurrent guesses, in threads or in worker
  processes, get no more than that.
- Every POST, the login included, must come from a page of this server and say what it
  sends (``SameOriginWrites``): an ``Origin`` (else ``Referer``) whose host is the request's
  ``Host`` (403), and a ``Content-Type`` that a cross-site HTML form cannot send (415):
  ``application/json``, or for a label upload ``application/octet-stream``/``application/gzip``.
  A form on another site could otherwise post ``text/plain`` JSON to /api/login and sign a
  reviewer's browser in as another account (login CSRF: their edits then saved under that name).
- ``api(action=...)``: session (401), CSRF (403), the role the policy allows for ``action``
  (403), a JSON POST body (415 otherwise, bounded: 413); the endpoint runs in the thread pool
  and an ``HTTPError`` becomes a JSON answer.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from metsflow.review_server import db, policy
from metsflow.review_server.service import HTTPError, ReviewApp, json_response

COOKIE_NAME = "metsflow_session"
CSRF_HEADER = "x-csrf-token"
MAX_JSON_BYTES = 64 * 1024
JSON_TYPE = "application/json"
UPLOAD_TYPES = ("application/octet-stream", "application/gzip")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def session_user(app: ReviewApp, request: Request) -> dict | None:
    with db.connect(app.db_path) as con:
        return db.session_user(con, request.cookies.get(COOKIE_NAME))


def check_csrf(request: Request, user: dict) -> None:
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, user["csrf_token"]):
        raise HTTPError(403, "missing or wrong CSRF token (header X-CSRF-Token)")


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_content_type(request: Request, *allowed: str) -> None:
    sent = content_type(request)
    if sent not in allowed:
        raise HTTPError(415, f"Content-Type must be {' or '.join(allowed)}, got {sent or 'none'!r}")


def origin_problem(headers, secure: bool) -> str | None:
    """Why a state-changing request does not come from this server's own pages (None: it
    does): its ``Origin``, or without one its ``Referer``, must name the ``Host`` it was sent
    to (and https when the cookies are ``Secure``). ``Origin: null`` (sandboxed frames, file
    pages) is refused. The host, not the scheme, is compared so that a TLS proxy in front,
    forwarding ``Host``, keeps working."""
    host = (headers.get("host") or "").lower()
    origin = headers.get("origin")
    source = origin if origin is not None else headers.get("referer")
    if not source:
        return "a POST must carry an Origin or Referer header naming this server"
    parts = urlsplit(source)
    schemes = ("https",) if secure else ("http", "https")
    if parts.scheme not in schemes or not host or parts.netloc.lower() != host:
        return f"cross-site request refused: {source[:200]!r} is not this server ({host})"
    return None


class SameOriginWrites:
    """Plain ASGI middleware: every request but GET/HEAD/OPTIONS must come from this server's
    pages (403) with a type a cross-site form cannot send (415), before any route runs; so
    routes added later are covered too."""

    def __init__(self, app, secure: bool = False):
        self.app, self.secure = app, secure

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            request = Request(scope)
            problem = origin_problem(request.headers, self.secure)
            status = 403
            if problem is None and content_type(request) not in (JSON_TYPE, *UPLOAD_TYPES):
                status, problem = (
                    415,
                    (
                        f"Content-Type must be {JSON_TYPE} (or {', '.join(UPLOAD_TYPES)} for a "
                        f"label upload), got {content_type(request) or 'none'!r}"
                    ),
                )
            if problem is not None:
                response = json_response(status, {"detail": problem})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def read_json(request: Request) -> dict:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_JSON_BYTES:
        raise HTTPError(413, f"request body larger than {MAX_JSON_BYTES} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise HTTPError(413, f"request body larger than {MAX_JSON_BYTES} bytes")
    if not body.strip():
        return {}
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise HTTPError(400, f"body is not JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise HTTPError(400, "body must be a JSON object")
    return payload


def api(action: policy.Action = policy.Action.VIEW, csrf: bool = True, json_body: bool = False):
    """Wrap a blocking endpoint ``fn(app, request, user, payload)``: session (401), CSRF (403),
    role allowed for ``action`` (403), JSON body; runs it in the thread pool; ``HTTPError``
    becomes a JSON answer."""

    def wrap(fn: Callable):
        async def endpoint(request: Request) -> Response:
            app: ReviewApp = request.app.state.review
            try:
                user = await run_in_threadpool(session_user, app, request)
                if user is None:
                    raise HTTPError(401, "not logged in")
                if csrf:
                    check_csrf(request, user)
                if request.method not in SAFE_METHODS:
                    require_content_type(request, JSON_TYPE)
                refusal = policy.role_refusal(action, user["role"])
                if refusal is not None:
                    raise HTTPError.refused(refusal)
                payload = await read_json(request) if json_body else None
                result = await run_in_threadpool(fn, app, request, user, payload)
            except HTTPError as exc:
                return json_response(exc.status, {"detail": exc.detail, **exc.extra})
            if isinstance(result, Response):
                return result
            return json_response(200, result)

        endpoint.__name__ = fn.__name__
        return endpoint

    return wrap


async def login(request: Request) -> Response:
    app: ReviewApp = request.app.state.review
    try:
        require_content_type(request, JSON_TYPE)
        payload = await read_json(request)
    except HTTPError as exc:
        return json_response(exc.status, {"detail": exc.detail})
    username = payload.get("username")
    password = payload.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return json_response(400, {"detail": "username and password are required"})
    if not policy.username_ok(username) or len(password) > policy.MAX_PASSWORD_CHARS:
        # No account can have this name or password (policy.ACCOUNT_RULES): no lookup, no hash.
        return json_response(401, {"detail": "wrong user name or password"})
    ip = client_ip(request)
    old_token = request.cookies.get(COOKIE_NAME)

    def attempt():
        with db.connect(app.db_path) as con:
            reserved = db.begin_login(con, username, ip)
            if reserved is None:
                return None, None, 429
            role = db.verify_password(con, username, password)
            if role is None:
                db.end_login(con, reserved, succeeded=False)
                return None, None, 401
            db.delete_session(con, old_token)  # whatever the client held is gone
            token, csrf_token = db.create_session(con, username)
            db.end_login(con, reserved, succeeded=True)
            return (token, csrf_token), role, 200

    session, role, status = await run_in_threadpool(attempt)
    if status == 429:
        return json_response(
            429,
            {"detail": f"too many failed logins for {username}: wait {int(db.LOGIN_WINDOW_S)} s"},
        )
    if status == 401:
        return json_response(401, {"detail": "wrong user name or password"})
    token, csrf_token = session
    response = json_response(200, {"username": username, "role": role, "csrf_token": csrf_token})
    response.set_cookie(
        COOKIE_NAME,
        token,
        max_age=db.SESSION_HOURS * 3600,
        path="/",
        httponly=True,
        samesite="strict",
        secure=app.config.secure_cookies,
    )
    return response


@api()
def logout(app, request, user, payload):
    with db.connect(app.db_path) as con:
        db.delete_session(con, request.cookies.get(COOKIE_NAME))
        db.log_event(con, "logout", user["username"], ip=client_ip(request))
    response = json_response(200, {})
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@api(csrf=False)
def me(app, request, user, payload):
    return {"username": user["username"], "role": user["role"], "csrf_token": user["csrf_token"]}
