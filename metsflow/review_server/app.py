"""The review web application (Starlette): pages, JSON API, label saves into the label store.

Security model (each point has a test in tests/test_review_server.py):
- Nothing but the login page, the static UI files and the NiiVue bundle is served without a
  session: the API answers 401, pages redirect to /login.
- Sessions: a random id in an HttpOnly, SameSite=Strict cookie (Secure with
  ``secure_cookies``); only its SHA-256 is stored; a login always issues a fresh id and drops
  the one the client sent (no fixation). Every state-changing request must carry the session's
  CSRF token in ``X-CSRF-Token``.
- Login throttling: ``db.LOGIN_FAILURES_ALLOWED`` failures per user name and address within
  ``db.LOGIN_WINDOW_S`` answer 429.
- Roles are checked here, not in the browser: a trainee works only on the studies assigned to
  them and saves ``refined`` versions; only a neuroradiologist confirms or sends back; an admin
  reassigns and overrides (with a reason). The label store refuses any version after a
  confirmed one, and does so under its per-study lock, so a confirmed label stays read-only
  whatever requests race.
- Study ids are looked up in the batches' manifests (unknown -> 404); files are only ever the
  manifest's own files or the store's versions; uploads go to a private temporary file and
  into the store through ``LabelStore.import_label`` (grid, values, provenance), never to a
  path a request names.
- Upload size is bounded before reading: ``Content-Length`` and the streamed byte count are
  checked against the reference volume's size (4 bytes per voxel + header margin) -> 413; the
  NIfTI header's dimensions are checked against the reference before any voxel is read, so a
  small gzip cannot inflate into an unbounded array.
"""

from __future__ import annotations

import gzip
import hmac
import json
import os
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import nibabel as nib
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from metsflow.active_learning.labelstore import LabelImportError, LabelStore, StaleLabelError
from metsflow.active_learning.review import LABEL_COLOURS, edit_summary
from metsflow.core.labels import INTERNAL_NAMES
from metsflow.review_server import db
from metsflow.review_server.assign import balanced_assignment
from metsflow.review_server.assists import ASSIST_HEADER, assist_provenance, assist_routes
from metsflow.review_server.catalog import FINAL_BATCH, Catalog, StudyEntry, lesions
from metsflow.review_server.config import ReviewConfig

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"
NIIVUE_DIST = PACKAGE_DIR / "web" / "node_modules" / "@niivue" / "niivue" / "dist"
COOKIE_NAME = "metsflow_session"
CSRF_HEADER = "x-csrf-token"
# A label upload may use up to 4 bytes per voxel (float32/int32) plus the header and any
# extensions; NIfTI-2's header is 540 bytes, 64 KiB leaves room for extensions.
MAX_BYTES_PER_VOXEL = 4
HEADER_MARGIN = 64 * 1024
MAX_JSON_BYTES = 64 * 1024
MAX_COMMENT_CHARS = 5000
STATUSES = ("pending", "refined", "sent_back", "confirmed")
TSV_COLUMNS = [
    "round",
    "batch",
    "study_id",
    "patient_id",
    "reviewer",
    "role",
    "stage",
    "version",
    "opened_at",
    "saved_at",
    "review_seconds",
]


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, **extra):
        self.status, self.detail, self.extra = status, detail, extra


# ---------------------------------------------------------------------- the application


class ReviewApp:
    """State shared by the requests of one server: settings, catalog, label store."""

    def __init__(self, config: ReviewConfig):
        self.config = config
        self.db_path = db.init_db(config.db_path)
        self.catalog = Catalog(config.results, config.round)
        self.store = LabelStore(config.label_store, known_studies=config.known_studies())

    # ------------------------------------------------------------ helpers

    def reference(self, entry: StudyEntry) -> Path:
        return self.config.reference_for(entry.study_id, entry.t1c)

    def reference_image(self, entry: StudyEntry) -> nib.Nifti1Image:
        """The reference opened lazily (header only): the store needs its shape and affine,
        and the image itself was checked when the pipeline read it. Not decoding the voxels
        made a 128^3 save 2.4x faster (0.43 -> 0.18 s)."""
        path = self.reference(entry)
        try:
            return nib.load(str(path))
        except (OSError, nib.filebasedimages.ImageFileError) as exc:
            raise HTTPError(500, f"reference image {path} unreadable: {exc}") from exc

    def entry(self, study_id: str) -> StudyEntry:
        entry = self.catalog.get(study_id)
        if entry is None:
            raise HTTPError(404, f"study {study_id!r} is not in the review batch")
        return entry

    def state(self, con, entry: StudyEntry, assignment: dict | None = None) -> dict:
        versions = self.store.versions(entry.study_id)
        stages = {v["stage"] for v in versions}
        if assignment is None:
            assignment = db.assignments(con).get(entry.study_id, {})
        if "confirmed" in stages:
            status = "confirmed"
        elif assignment.get("sent_back"):
            status = "sent_back"
        elif "refined" in stages:
            status = "refined"
        else:
            status = "pending"
        return {
            "status": status,
            "assigned_to": assignment.get("username"),
            "latest_version": versions[-1]["version"] if versions else 0,
            "latest_stage": versions[-1]["stage"] if versions else None,
        }

    def visible(self, con, user: dict, entry: StudyEntry) -> dict:
        """The study's state if ``user`` may see it; 403 for a trainee's foreign study."""
        state = self.state(con, entry)
        if user["role"] == "trainee" and state["assigned_to"] != user["username"]:
            raise HTTPError(403, f"study {entry.study_id} is not assigned to you")
        return state

    def last_comment(self, con, study_id: str) -> str:
        found = [c for c in db.comments(con, study_id) if c["kind"] == "send_back"]
        return found[-1]["text"] if found else ""


def _json(status: int, body: dict) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _session_user(app: ReviewApp, request: Request) -> dict | None:
    with db.connect(app.db_path) as con:
        return db.session_user(con, request.cookies.get(COOKIE_NAME))


def _check_csrf(request: Request, user: dict) -> None:
    sent = request.headers.get(CSRF_HEADER, "")
    if not sent or not hmac.compare_digest(sent, user["csrf_token"]):
        raise HTTPError(403, "missing or wrong CSRF token (header X-CSRF-Token)")


async def _read_json(request: Request) -> dict:
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


def api(roles: tuple[str, ...] | None = None, csrf: bool = True, json_body: bool = False):
    """Wrap a blocking endpoint ``fn(app, request, user, payload)``: session (401), CSRF (403),
    role (403), JSON body; runs it in the thread pool; ``HTTPError`` becomes a JSON answer."""

    def wrap(fn: Callable):
        async def endpoint(request: Request) -> Response:
            app: ReviewApp = request.app.state.review
            try:
                user = await run_in_threadpool(_session_user, app, request)
                if user is None:
                    raise HTTPError(401, "not logged in")
                if csrf:
                    _check_csrf(request, user)
                if roles is not None and user["role"] not in roles:
                    raise HTTPError(
                        403, f"{user['role']} may not do this ({', '.join(roles)} only)"
                    )
                payload = await _read_json(request) if json_body else None
                result = await run_in_threadpool(fn, app, request, user, payload)
            except HTTPError as exc:
                return _json(exc.status, {"detail": exc.detail, **exc.extra})
            if isinstance(result, Response):
                return result
            return _json(200, result)

        endpoint.__name__ = fn.__name__
        return endpoint

    return wrap


# ---------------------------------------------------------------------- login


async def login(request: Request) -> Response:
    app: ReviewApp = request.app.state.review
    try:
        payload = await _read_json(request)
    except HTTPError as exc:
        return _json(exc.status, {"detail": exc.detail})
    username = payload.get("username")
    password = payload.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        return _json(400, {"detail": "username and password are required"})
    ip = _client_ip(request)
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
        return _json(
            429,
            {"detail": f"too many failed logins for {username}: wait {int(db.LOGIN_WINDOW_S)} s"},
        )
    if status == 401:
        return _json(401, {"detail": "wrong user name or password"})
    token, csrf_token = session
    response = _json(200, {"username": username, "role": role, "csrf_token": csrf_token})
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
        db.log_event(con, "logout", user["username"], ip=_client_ip(request))
    response = _json(200, {})
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response


@api(csrf=False)
def me(app, request, user, payload):
    return {"username": user["username"], "role": user["role"], "csrf_token": user["csrf_token"]}


# ---------------------------------------------------------------------- queue and study


@api(csrf=False)
def queue(app, request, user, payload):
    role, name = user["role"], user["username"]
    with db.connect(app.db_path) as con:
        assigned = db.assignments(con)
        items = []
        for entry in app.catalog.studies().values():
            state = app.state(con, entry, assigned.get(entry.study_id, {}))
            if role == "trainee" and state["assigned_to"] != name:
                continue
            if role == "neuroradiologist" and state["status"] == "pending":
                continue
            comment = (
                app.last_comment(con, entry.study_id) if state["status"] == "sent_back" else ""
            )
            items.append(
                {
                    "study_id": entry.study_id,
                    "patient_id": entry.patient_id,
                    "batch": entry.batch,
                    **state,
                    "comment": comment,
                }
            )
    # Work first: what this role acts on, then the rest; patients together.
    first = {"trainee": ("sent_back", "pending"), "neuroradiologist": ("refined",)}.get(role, ())
    items.sort(key=lambda i: (i["status"] not in first, i["patient_id"], i["study_id"]))
    return {"round": app.catalog.round, "batches": app.catalog.batch_names(), "items": items}


def _study_url(entry: StudyEntry, tail: str) -> str:
    return f"/api/studies/{entry.study_id}/{tail}"


@api(csrf=False)
def study(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    role = user["role"]
    with db.connect(app.db_path) as con:
        state = app.visible(con, user, entry)
        comments = db.comments(con, entry.study_id)
    found, source = lesions(entry, app.catalog.uncertainty_map(entry))
    open_ = state["status"] != "confirmed"
    can_edit = open_ and (
        (role == "trainee" and state["assigned_to"] == user["username"])
        or role == "neuroradiologist"
    )
    can_confirm = role == "neuroradiologist" and open_ and state["latest_stage"] == "refined"
    return {
        "study_id": entry.study_id,
        "patient_id": entry.patient_id,
        "batch": entry.batch,
        "round": entry.round,
        **state,
        "images": {seq: _study_url(entry, f"image/{seq}") for seq in entry.images},
        "label_url": _study_url(entry, "label")
        if state["latest_version"]
        else _study_url(entry, "presegmentation"),
        "presegmentation_url": _study_url(entry, "presegmentation"),
        "lesions": found,
        "uncertainty_source": source,
        # The colour table has one owner (review.LABEL_COLOURS, shared with ITK-SNAP/Slicer).
        "palette": [
            {"value": value, "name": INTERNAL_NAMES[value], "rgb": list(rgb)}
            for value, rgb in LABEL_COLOURS
        ],
        "comments": comments,
        "history": app.store.history(entry.study_id),
        "can_edit": can_edit,
        "can_confirm": can_confirm,
        "can_send_back": role == "neuroradiologist" and open_,
        "can_override": role == "admin",
        "save_stage": ("refined" if role == "trainee" else "confirmed") if can_edit else None,
    }


def _gzip_file(path: Path) -> FileResponse:
    return FileResponse(
        path,
        media_type="application/gzip",
        headers={"Cache-Control": "private, no-store"},
        filename=path.name,
        content_disposition_type="inline",
    )


@api(csrf=False)
def image(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    with db.connect(app.db_path) as con:
        app.visible(con, user, entry)
    name = request.path_params["name"]
    if name not in entry.images:
        raise HTTPError(404, f"study {entry.study_id} has no {name!r} image")
    return _gzip_file(entry.images[name])


@api(csrf=False)
def presegmentation(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    with db.connect(app.db_path) as con:
        app.visible(con, user, entry)
    return _gzip_file(entry.presegmentation)


@api(csrf=False)
def label(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    with db.connect(app.db_path) as con:
        app.visible(con, user, entry)
    versions = app.store.versions(entry.study_id)
    wanted = request.query_params.get("version")
    if wanted is not None:
        versions = [v for v in versions if str(v["version"]) == wanted]
        if not versions:
            raise HTTPError(404, f"study {entry.study_id} has no label version {wanted}")
    if not versions:
        return _gzip_file(entry.presegmentation)
    return _gzip_file(versions[-1]["path"])


@api()
def open_study(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    now = time.time()
    with db.connect(app.db_path) as con:
        app.visible(con, user, entry)
        db.log_event(con, "open", user["username"], entry.study_id, ip=_client_ip(request), at=now)
    return {"opened_at": db.iso(now)}


# ---------------------------------------------------------------------- saving labels


def _int_param(request: Request, name: str, required: bool) -> int | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        if required:
            raise HTTPError(
                400, f"query parameter {name} is required (the version you started from)"
            )
        return None
    if not value.isdigit():
        raise HTTPError(400, f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


@lru_cache(maxsize=1024)
def _reference_shape(path: str, mtime: int) -> tuple[int, ...]:
    return tuple(int(n) for n in nib.load(path).header.get_data_shape()[:3])


def _upload_limit(reference: Path) -> tuple[tuple[int, ...], int]:
    try:
        shape = _reference_shape(str(reference), reference.stat().st_mtime_ns)
    except (OSError, nib.filebasedimages.ImageFileError) as exc:
        raise HTTPError(500, f"reference image unreadable: {exc}") from exc
    voxels = 1
    for n in shape:
        voxels *= n
    return shape, voxels * MAX_BYTES_PER_VOXEL + HEADER_MARGIN


def _header_problem(head: bytes, shape: tuple[int, ...]) -> str | None:
    """Check the first bytes of the (decompressed) upload: a NIfTI-1/2 header whose 3D
    dimensions equal the reference's. None if fine, else the problem in words."""
    if len(head) < 348:
        return "not a NIfTI file (shorter than a NIfTI header)"
    for endian in ("<", ">"):
        (size,) = struct.unpack(endian + "i", head[:4])
        if size == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            magic = head[344:348]
            if magic not in (b"n+1\x00", b"ni1\x00"):
                return "not a NIfTI file (no NIfTI-1 magic)"
            break
        if size == 540:
            if len(head) < 540:
                return "not a NIfTI file (truncated NIfTI-2 header)"
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            break
    else:
        return "not a NIfTI file (no NIfTI-1/2 header)"
    ndim = dims[0]
    if not 3 <= ndim <= 7 or any(d != 1 for d in dims[4 : ndim + 1]):
        return f"label must be a 3D volume, got {ndim} dimensions {tuple(dims[1 : ndim + 1])}"
    got = tuple(int(d) for d in dims[1:4])
    if got != tuple(shape):
        return f"grid mismatch: label shape {got} != reference (native T1c) shape {tuple(shape)}"
    if bitpix > 8 * MAX_BYTES_PER_VOXEL:
        return f"label voxels of {bitpix} bits: use an integer or float type of at most 32 bits"
    return None


async def _receive_upload(request: Request, shape: tuple[int, ...], limit: int) -> Path:
    """Stream the body into a private temporary NIfTI file, refusing more than ``limit``
    bytes (413) and anything whose header is not a NIfTI of the reference's shape (400)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise HTTPError(
            413,
            f"upload of {int(length)} bytes is larger than a label of this study can be "
            f"({limit} bytes for shape {tuple(shape)})",
        )
    fd, name = tempfile.mkstemp(prefix="metsflow-upload-", suffix=".part")
    path = Path(name)
    received = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise HTTPError(
                        413,
                        f"upload larger than a label of this study can be ({limit} bytes "
                        f"for shape {tuple(shape)})",
                    )
                handle.write(chunk)
        if received == 0:
            raise HTTPError(400, "empty body: send the label volume as NIfTI bytes")
        with open(path, "rb") as handle:
            magic = handle.read(2)
        compressed = magic == b"\x1f\x8b"
        try:
            if compressed:
                with gzip.open(path, "rb") as handle:
                    head = handle.read(540)
            else:
                with open(path, "rb") as handle:
                    head = handle.read(540)
        except (OSError, EOFError) as exc:
            raise HTTPError(400, f"not a NIfTI file (broken gzip stream: {exc})") from exc
        problem = _header_problem(head, shape)
        if problem:
            raise HTTPError(400, problem)
        final = path.with_name(path.name[: -len(".part")] + (".nii.gz" if compressed else ".nii"))
        os.rename(path, final)
        return final
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _store_problem(exc: LabelImportError) -> HTTPError:
    if isinstance(exc, StaleLabelError):
        return HTTPError(409, exc.problem, saved_by=exc.saved_by, version=exc.latest_version)
    if "already has a confirmed label" in exc.problem:
        return HTTPError(409, exc.problem, confirmed=True)
    return HTTPError(400, exc.problem)


def _write_version(
    app: ReviewApp,
    request: Request,
    user: dict,
    entry: StudyEntry,
    label_path: Path,
    stage: str,
    base_version: int | None,
    kind: str,
    override_reason: str | None = None,
    comment: str | None = None,
    assists: dict | None = None,
) -> dict:
    """Import one label through the label store and log it; the review time is the time since
    this user's last ``open`` of the study (recorded in the store's history too)."""
    now = time.time()
    with db.connect(app.db_path) as con:
        opened = db.last_open(con, user["username"], entry.study_id)
    seconds = None if opened is None else round(now - opened, 1)
    provenance = {"via": "web", "review_seconds": seconds, "server_user_role": user["role"]}
    if opened is not None:
        provenance["opened_at"] = db.iso(opened)
    if comment:
        provenance["comment"] = comment
    if assists:
        provenance["assists"] = assists  # accept/dismiss decisions (review_server.assists)
    _, edit = edit_summary(label_path, entry.presegmentation, entry.study_id)
    try:
        version = app.store.import_label(
            entry.study_id,
            label_path,
            stage=stage,
            reviewer=user["username"],
            reference_image=app.reference_image(entry),
            source="override" if override_reason else f"{entry.model}/round_{entry.round}",
            override=override_reason is not None,
            reason=override_reason,
            note=f"web review ({entry.batch}); {edit}",
            base_version=base_version,
            provenance=provenance,
        )
    except LabelImportError as exc:
        with db.connect(app.db_path) as con:
            db.log_event(
                con,
                f"{kind}_refused",
                user["username"],
                entry.study_id,
                ip=_client_ip(request),
                problem=exc.problem,
            )
        raise _store_problem(exc) from exc
    with db.connect(app.db_path) as con, db.transaction(con):
        db.log_event(
            con,
            kind,
            user["username"],
            entry.study_id,
            version,
            ip=_client_ip(request),
            at=now,
            stage=stage,
            role=user["role"],
            review_seconds=seconds,
            opened_at=provenance.get("opened_at"),
            batch=entry.batch,
            round=entry.round,
            patient_id=entry.patient_id,
            reason=override_reason,
        )
        db.set_sent_back(con, entry.study_id, entry.patient_id, entry.batch, False)
    return {"version": version, "stage": stage}


def _save_permission(app: ReviewApp, user: dict, entry: StudyEntry, confirm: bool) -> str:
    role = user["role"]
    with db.connect(app.db_path) as con:
        state = app.visible(con, user, entry)
    if role == "admin":
        raise HTTPError(403, "admins change labels only by override (with a reason)")
    if role == "trainee" and confirm:
        raise HTTPError(403, "only a neuroradiologist confirms")
    if state["status"] == "confirmed":
        raise HTTPError(
            409,
            f"study {entry.study_id} is confirmed: read-only (an admin may override)",
            confirmed=True,
        )
    return "confirmed" if confirm else "refined"


async def _upload_endpoint(request: Request, prepare, finish) -> Response:
    """Shared body of save and override: session/CSRF/permission checks before a byte of the
    body is read, then the bounded upload, then the store import in the thread pool."""
    app: ReviewApp = request.app.state.review
    upload = None
    try:
        user = await run_in_threadpool(_session_user, app, request)
        if user is None:
            raise HTTPError(401, "not logged in")
        _check_csrf(request, user)
        entry, context = await run_in_threadpool(prepare, app, request, user)
        shape, limit = _upload_limit(app.reference(entry))
        upload = await _receive_upload(request, shape, limit)
        result = await run_in_threadpool(finish, app, request, user, entry, context, upload)
    except HTTPError as exc:
        return _json(exc.status, {"detail": exc.detail, **exc.extra})
    finally:
        if upload is not None:
            upload.unlink(missing_ok=True)
    return _json(200, result)


async def save(request: Request) -> Response:
    def prepare(app, request, user):
        entry = app.entry(request.path_params["study_id"])
        base = _int_param(request, "base_version", required=True)
        confirm = request.query_params.get("confirm") in ("1", "true", "yes")
        stage = _save_permission(app, user, entry, confirm)
        try:
            assists = assist_provenance(request.headers.get(ASSIST_HEADER), entry)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from exc
        return entry, (base, stage, assists)

    def finish(app, request, user, entry, context, upload):
        base, stage, assists = context
        return _write_version(
            app, request, user, entry, upload, stage, base, "save", assists=assists
        )

    return await _upload_endpoint(request, prepare, finish)


async def override(request: Request) -> Response:
    def prepare(app, request, user):
        if user["role"] != "admin":
            raise HTTPError(403, "only an admin overrides")
        entry = app.entry(request.path_params["study_id"])
        reason = (request.query_params.get("reason") or "").strip()
        if not reason:
            raise HTTPError(400, "an override needs a reason (?reason=...)")
        return entry, (reason, _int_param(request, "base_version", required=False))

    def finish(app, request, user, entry, context, upload):
        reason, base = context
        return _write_version(
            app, request, user, entry, upload, "confirmed", base, "override", override_reason=reason
        )

    return await _upload_endpoint(request, prepare, finish)


@api(roles=("neuroradiologist",), json_body=True)
def confirm(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    base = payload.get("base_version")
    if not isinstance(base, int) or isinstance(base, bool) or base < 0:
        raise HTTPError(400, "base_version (the version you reviewed) is required")
    _save_permission(app, user, entry, confirm=True)
    versions = app.store.versions(entry.study_id)
    if any(v["stage"] == "confirmed" for v in versions):  # confirmed since the check above
        raise HTTPError(409, f"study {entry.study_id} is confirmed: read-only", confirmed=True)
    if not versions or versions[-1]["stage"] != "refined":
        raise HTTPError(400, f"study {entry.study_id} has no refined label to confirm")
    return _write_version(
        app,
        request,
        user,
        entry,
        versions[-1]["path"],
        "confirmed",
        base,
        "confirm",
        comment=f"confirmed version {versions[-1]['version']} unchanged",
    )


@api(roles=("neuroradiologist",), json_body=True)
def send_back(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    comment = payload.get("comment")
    if not isinstance(comment, str) or not comment.strip():
        raise HTTPError(400, "sending back needs a comment for the trainee")
    if len(comment) > MAX_COMMENT_CHARS:
        raise HTTPError(400, f"comment longer than {MAX_COMMENT_CHARS} characters")
    with db.connect(app.db_path) as con, db.transaction(con):
        if app.state(con, entry)["status"] == "confirmed":
            raise HTTPError(409, f"study {entry.study_id} is confirmed: read-only", confirmed=True)
        db.set_sent_back(con, entry.study_id, entry.patient_id, entry.batch, True)
        db.add_comment(con, entry.study_id, user["username"], user["role"], "send_back", comment)
        db.log_event(con, "send_back", user["username"], entry.study_id, ip=_client_ip(request))
    return {"status": "sent_back"}


@api(json_body=True)
def comment(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    text = payload.get("text")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_COMMENT_CHARS:
        raise HTTPError(400, f"text must be 1-{MAX_COMMENT_CHARS} characters")
    with db.connect(app.db_path) as con:
        app.visible(con, user, entry)
        db.add_comment(con, entry.study_id, user["username"], user["role"], "note", text)
    return {"ok": True}


# ---------------------------------------------------------------------- admin


@api(roles=("admin",), csrf=False)
def users(app, request, user, payload):
    with db.connect(app.db_path) as con:
        return {"users": db.list_users(con)}


def assign_studies(
    app: ReviewApp, username: str, study_id: str | None, patient_id: str | None, by: str
) -> list[str]:
    """Reassign one study, or all of a patient's studies, to a trainee (the admin's act)."""
    with db.connect(app.db_path) as con, db.transaction(con):
        if db.user_role(con, username) != "trainee":
            raise HTTPError(400, f"{username!r} is not a trainee account")
        studies = app.catalog.studies()
        if study_id is not None:
            chosen = [app.entry(study_id)]
        else:
            chosen = [e for e in studies.values() if e.patient_id == patient_id]
            if not chosen:
                raise HTTPError(404, f"patient {patient_id!r} has no study in the review batch")
        for entry in chosen:
            db.set_assignment(con, entry.study_id, entry.patient_id, entry.batch, username)
            db.log_event(con, "reassign", by, entry.study_id, to=username)
    return [e.study_id for e in chosen]


def auto_assign(app: ReviewApp, by: str) -> dict[str, int]:
    """Assign every unassigned study of the served batches (balanced, patients together)."""
    with db.connect(app.db_path) as con, db.transaction(con):
        trainees = [u["username"] for u in db.list_users(con) if u["role"] == "trainee"]
        current = {s: a["username"] for s, a in db.assignments(con).items()}
        studies = app.catalog.studies()
        try:
            new = balanced_assignment(
                [(e.study_id, e.patient_id) for e in studies.values()], trainees, current
            )
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from exc
        counts: dict[str, int] = {}
        for study_id, username in new.items():
            entry = studies[study_id]
            db.set_assignment(con, study_id, entry.patient_id, entry.batch, username)
            db.log_event(con, "assign", by, study_id, to=username)
            counts[username] = counts.get(username, 0) + 1
    return counts


@api(roles=("admin",), json_body=True)
def assign(app, request, user, payload):
    username = payload.get("username")
    study_id, patient_id = payload.get("study_id"), payload.get("patient_id")
    if not isinstance(username, str) or (study_id is None) == (patient_id is None):
        raise HTTPError(400, "give username and one of study_id / patient_id")
    return {"assigned": assign_studies(app, username, study_id, patient_id, user["username"])}


@api(roles=("admin",), json_body=True)
def assign_auto(app, request, user, payload):
    return {"assigned": auto_assign(app, user["username"])}


def dashboard_data(app: ReviewApp) -> dict:
    """Progress per batch and per reviewer, time per study (open -> save), and per round
    (every round ever reviewed in the browser, from the audit log): saves and review time."""
    with db.connect(app.db_path) as con:
        assigned = db.assignments(con)
        people = {u["username"]: u["role"] for u in db.list_users(con)}
        saves = db.events(con, ("save", "confirm", "override"))
        rows = []
        for entry in app.catalog.studies().values():
            state = app.state(con, entry, assigned.get(entry.study_id, {}))
            rows.append((entry, state))
    totals = dict.fromkeys((*STATUSES, "total"), 0)
    batches: dict[str, dict] = {}
    studies = []
    by_study: dict[str, list[dict]] = {}
    for event in saves:
        by_study.setdefault(event["study_id"], []).append(event)
    for entry, state in rows:
        totals[state["status"]] += 1
        totals["total"] += 1
        batch = batches.setdefault(
            entry.batch, {"batch": entry.batch, **dict.fromkeys((*STATUSES, "total"), 0)}
        )
        batch[state["status"]] += 1
        batch["total"] += 1
        history = app.store.history(entry.study_id)
        by_stage = {r.get("stage"): r for r in history}
        seconds = {stage: 0.0 for stage in ("refined", "confirmed")}
        for event in by_study.get(entry.study_id, []):
            value = event["detail"].get("review_seconds")
            if value is not None:
                seconds[event["detail"].get("stage", "refined")] += float(value)
        studies.append(
            {
                "study_id": entry.study_id,
                "patient_id": entry.patient_id,
                "batch": entry.batch,
                "status": state["status"],
                "assigned_to": state["assigned_to"],
                "refined_by": by_stage.get("refined", {}).get("reviewer", ""),
                "confirmed_by": by_stage.get("confirmed", {}).get("reviewer", ""),
                "refine_seconds": round(seconds["refined"], 1),
                "confirm_seconds": round(seconds["confirmed"], 1),
            }
        )
    reviewers = []
    for username, role in sorted(people.items()):
        mine = [e for e in saves if e["username"] == username]
        times = [
            float(e["detail"]["review_seconds"])
            for e in mine
            if e["detail"].get("review_seconds") is not None
        ]
        reviewers.append(
            {
                "username": username,
                "role": role,
                "assigned": sum(1 for a in assigned.values() if a.get("username") == username),
                "saves": len(mine),
                "refined": sum(1 for e in mine if e["detail"].get("stage") == "refined"),
                "confirmed": sum(1 for e in mine if e["detail"].get("stage") == "confirmed"),
                "median_seconds": round(statistics.median(times), 1) if times else None,
                "total_seconds": round(sum(times), 1),
            }
        )
    per_round: dict[str, list[dict]] = {}
    for event in saves:
        detail = event["detail"]
        key = detail.get("batch") if detail.get("batch") == FINAL_BATCH else detail.get("round")
        per_round.setdefault(str(key), []).append(detail)
    rounds = []
    for key, details in sorted(per_round.items()):
        times = [float(d["review_seconds"]) for d in details if d.get("review_seconds") is not None]
        rounds.append(
            {
                "round": key,
                "saves": len(details),
                "refined": sum(1 for d in details if d.get("stage") == "refined"),
                "confirmed": sum(1 for d in details if d.get("stage") == "confirmed"),
                "median_seconds": round(statistics.median(times), 1) if times else None,
                "total_seconds": round(sum(times), 1),
            }
        )
    return {
        "round": app.catalog.round,
        "totals": totals,
        "batches": list(batches.values()),
        "rounds": rounds,
        "reviewers": reviewers,
        "studies": studies,
    }


def review_times_tsv(app: ReviewApp) -> str:
    """One row per web save (``TSV_COLUMNS``): who saved which study at which stage, when it
    was opened and saved, and the seconds in between."""
    with db.connect(app.db_path) as con:
        saves = db.events(con, ("save", "confirm", "override"))
    lines = ["\t".join(TSV_COLUMNS)]
    for event in saves:
        detail = event["detail"]
        values = {
            "round": detail.get("round"),
            "batch": detail.get("batch"),
            "study_id": event["study_id"],
            "patient_id": detail.get("patient_id"),
            "reviewer": event["username"],
            "role": detail.get("role"),
            "stage": detail.get("stage"),
            "version": event["version"],
            "opened_at": detail.get("opened_at"),
            "saved_at": db.iso(event["at"]),
            "review_seconds": detail.get("review_seconds"),
        }
        cells = ["" if values[c] is None else str(values[c]) for c in TSV_COLUMNS]
        lines.append("\t".join(c.replace("\t", " ").replace("\n", " ") for c in cells))
    return "\n".join(lines) + "\n"


@api(roles=("admin",), csrf=False)
def dashboard(app, request, user, payload):
    return dashboard_data(app)


@api(roles=("admin",), csrf=False)
def dashboard_tsv(app, request, user, payload):
    return PlainTextResponse(
        review_times_tsv(app),
        media_type="text/tab-separated-values",
        headers={
            "Content-Disposition": 'attachment; filename="review_times.tsv"',
            "Cache-Control": "no-store",
        },
    )


# ---------------------------------------------------------------------- pages


def _page(name: str) -> Response:
    path = STATIC_DIR / name
    if not path.is_file():
        return PlainTextResponse(f"{name} is missing from {STATIC_DIR}", status_code=500)
    return FileResponse(path, media_type="text/html", headers={"Cache-Control": "no-store"})


async def login_page(request: Request) -> Response:
    return _page("login.html")


def _page_for_user(page: str, check_study: bool = False):
    async def endpoint(request: Request) -> Response:
        app: ReviewApp = request.app.state.review
        user = await run_in_threadpool(_session_user, app, request)
        if user is None:
            from urllib.parse import quote

            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        if check_study and app.catalog.get(request.path_params["study_id"]) is None:
            return PlainTextResponse("unknown study", status_code=404)
        return _page(page)

    return endpoint


class SecurityHeaders:
    """Plain ASGI middleware (no request buffering): nosniff, no framing, same-origin referrer."""

    HEADERS = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
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
    prefix = "/api/studies/{study_id}"
    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/", _page_for_user("index.html"), methods=["GET"]),
        Route("/study/{study_id}", _page_for_user("editor.html", True), methods=["GET"]),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/me", me, methods=["GET"]),
        Route("/api/queue", queue, methods=["GET"]),
        Route("/api/users", users, methods=["GET"]),
        Route("/api/assign", assign, methods=["POST"]),
        Route("/api/assign/auto", assign_auto, methods=["POST"]),
        Route("/api/dashboard", dashboard, methods=["GET"]),
        Route("/api/dashboard.tsv", dashboard_tsv, methods=["GET"]),
        Route(prefix, study, methods=["GET"]),
        Route(prefix + "/image/{name}", image, methods=["GET"]),
        Route(prefix + "/label", label, methods=["GET"]),
        Route(prefix + "/presegmentation", presegmentation, methods=["GET"]),
        Route(prefix + "/open", open_study, methods=["POST"]),
        Route(prefix + "/save", save, methods=["POST"]),
        Route(prefix + "/confirm", confirm, methods=["POST"]),
        Route(prefix + "/send_back", send_back, methods=["POST"]),
        Route(prefix + "/comment", comment, methods=["POST"]),
        Route(prefix + "/override", override, methods=["POST"]),
        *assist_routes(prefix, api, HTTPError, _gzip_file),
        Mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
        Mount("/vendor/niivue", StaticFiles(directory=NIIVUE_DIST, check_dir=False), name="niivue"),
    ]

    async def not_found(request: Request, exc) -> Response:
        if request.url.path.startswith("/api/"):
            return _json(404, {"detail": "not found"})
        return PlainTextResponse("not found", status_code=404)

    application = Starlette(
        routes=routes,
        middleware=[Middleware(SecurityHeaders)],
        exception_handlers={404: not_found},
    )
    application.state.review = ReviewApp(config)
    return application
