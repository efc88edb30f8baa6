"""Sessions, CSRF, login and logout, and the wrapper every JSON endpoint goes through.

- Sessions: a random id in an HttpOnly, SameSite=Strict cookie (Secure with
  ``secure_cookies``); only its SHA-256 is stored (``db``); a login always issues a fresh id
  and drops the one the client sent (no fixation).
- Every state-changing request must carry the session's CSRF token in ``X-CSRF-Token``.
- Login throttling: ``db.LOGIN_FAILURES_ALLOWED`` failures per user name and address within
  ``db.LOGIN_WINDOW_S`` answer 429.
- ``api(action=...)``: session (401), CSRF (403), the role the policy allows for ``action``
  (403), bounded JSON body; the endpoint runs in the thread pool and an ``HTTPError`` becomes
  a JSON answer.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from metsflow.review_server import db, policy
from metsflow.review_server.service import HTTPError, ReviewApp, json_response

COOKIE_NAME = "metsflow_session"
CSRF_HEADER = "x-csrf-token"
MAX_JSON_BYTES = 64 * 1024


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def session_user(app: ReviewApp, request: Request) -> dict | None:
    with db.connect(app.db_path) as con:
        return db.session_user(con, request.cookies.get(COOKIE_NAME))


def check_csrf(request: Request, user: dict) -> None:
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, user["csrf_token"]):
        raise HTTPError(403, "missing or wrong CSRF token (header X-CSRF-Token)")


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
        payload = await read_json(request)
    except HTTPError as exc:
        return json_response(exc.status, {"detail": exc.detail})
    username = payload.get("username")
    password = payload.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return json_response(400, {"detail": "username and password are required"})
    ip = client_ip(request)
    old_token = request.cookies.get(COOKIE_NAME)

    def attempt():
        with db.connect(app.db_path) as con:
            if db.recent_login_failures(con, username, ip) >= db.LOGIN_FAILURES_ALLOWED:
                db.log_event(con, "login_throttled", username, ip=ip)
                return None, None, 429
            role = db.verify_password(con, username, password)
            if role is None:
                db.log_event(con, "login_fail", username, ip=ip)
                return None, None, 401
            db.delete_session(con, old_token)  # whatever the client held is gone
            token, csrf_token = db.create_session(con, username)
            db.log_event(con, "login", username, ip=ip)
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
