"""The review server's routes: pages, the JSON API over studies, label saves, admin acts.

Roles are checked here through ``policy`` (never in the browser); study ids are looked up in
the batches' manifests (unknown -> 404); files served are only ever the manifest's own files
or the label store's versions; uploads (``upload``) go into the store through
``LabelStore.import_label`` (grid, values, provenance), never to a path a request names.
"""

from __future__ import annotations

import time
from pathlib import Path

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from metsflow.active_learning.labelstore import LabelImportError, StaleLabelError
from metsflow.active_learning.review import LABEL_COLOURS, edit_summary
from metsflow.core.io import remove_path
from metsflow.core.labels import INTERNAL_NAMES
from metsflow.review_server import db, policy
from metsflow.review_server.assign import assign_studies, auto_assign
from metsflow.review_server.assists import ASSIST_HEADER, assist_provenance, assist_routes
from metsflow.review_server.auth import (
    UPLOAD_TYPES,
    api,
    check_csrf,
    client_ip,
    login,
    logout,
    me,
    require_content_type,
    session_user,
)
from metsflow.review_server.catalog import StudyEntry, lesions
from metsflow.review_server.dashboard import dashboard_data, review_times_tsv
from metsflow.review_server.policy import Action, Stage
from metsflow.review_server.service import HTTPError, ReviewApp, json_response
from metsflow.review_server.upload import receive_upload, upload_limit

PACKAGE_DIR = Path(__file__).resolve().parent
STATIC_DIR = PACKAGE_DIR / "static"
NIIVUE_DIST = PACKAGE_DIR / "web" / "node_modules" / "@niivue" / "niivue" / "dist"
MAX_COMMENT_CHARS = 5000


# ---------------------------------------------------------------------- queue and study


@api(csrf=False)
def queue(app, request, user, payload):
    role, name = user["role"], user["username"]
    with db.connect(app.db_path) as con:
        assigned = db.assignments(con)
        items = []
        for entry in app.catalog.studies().values():
            state = app.state(con, entry, assigned.get(entry.study_id, {}))
            if not policy.in_queue(role, state["status"], state["assigned_to"] == name):
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
    first = policy.QUEUE_FIRST[policy.Role(role)]
    items.sort(key=lambda i: (i["status"] not in first, i["patient_id"], i["study_id"]))
    return {"round": app.catalog.round, "batches": app.catalog.batch_names(), "items": items}


def _study_url(entry: StudyEntry, tail: str) -> str:
    return f"/api/studies/{entry.study_id}/{tail}"


@api(csrf=False)
def study(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    with db.connect(app.db_path) as con:
        state = app.visible(con, user, entry)
        comments = db.comments(con, entry.study_id)
    found, source = lesions(entry, app.catalog.uncertainty_map(entry))
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
        **policy.capabilities(
            user["role"],
            state["status"],
            mine=state["assigned_to"] == user["username"],
            latest_stage=state["latest_stage"],
        ),
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
    entry = app.visible_entry(user, request.path_params["study_id"])
    name = request.path_params["name"]
    if name not in entry.images:
        raise HTTPError(404, f"study {entry.study_id} has no {name!r} image")
    return _gzip_file(entry.view_image(name))


@api(csrf=False)
def presegmentation(app, request, user, payload):
    entry = app.visible_entry(user, request.path_params["study_id"])
    return _gzip_file(entry.presegmentation)


@api(csrf=False)
def label(app, request, user, payload):
    entry = app.visible_entry(user, request.path_params["study_id"])
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
        db.log_event(con, "open", user["username"], entry.study_id, ip=client_ip(request), at=now)
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
            note=f"web review ({entry.batch})",
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
                ip=client_ip(request),
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
            ip=client_ip(request),
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
    app.defer(_log_edit, app, entry, user["username"], version)
    return {"version": version, "stage": stage}


def _log_edit(app: ReviewApp, entry: StudyEntry, username: str, version: int) -> None:
    """The edit from the pre-segmentation to a saved version (``review.edit_summary``: voxels
    changed, lesions added / removed / resized), logged as an ``edit`` event once the save has
    answered. Derived figures, recomputable from the two files at any time: at 1 mm they took
    0.15-0.2 s of a save's ~0.25 s of CPU, which 20 simultaneous saves queued behind one
    another (bench_review_load.py --clinical)."""
    found = [v["path"] for v in app.store.versions(entry.study_id) if v["version"] == version]
    if not found:
        return
    burden, summary = edit_summary(found[0], entry.presegmentation, entry.study_id)
    with db.connect(app.db_path) as con:
        db.log_event(
            con, "edit", username, entry.study_id, version, summary=summary, **(burden or {})
        )


def _save_permission(app: ReviewApp, user: dict, entry: StudyEntry, action: Action) -> None:
    with db.connect(app.db_path) as con:
        app.decide(con, user, entry, action)


async def _upload_endpoint(request: Request, prepare, finish) -> Response:
    """Shared body of save and override: session/CSRF/permission checks before a byte of the
    body is read, then the bounded upload, then the store import in the thread pool."""
    app: ReviewApp = request.app.state.review
    upload = None
    try:
        user = await run_in_threadpool(session_user, app, request)
        if user is None:
            raise HTTPError(401, "not logged in")
        check_csrf(request, user)
        require_content_type(request, *UPLOAD_TYPES)
        entry, context = await run_in_threadpool(prepare, app, request, user)
        # In the pool, not on the event loop: the first call per study and process opens the
        # T1c's header (gzip and nibabel's checks, ~5 ms at 1 mm), and py-spy caught the event
        # loop there, every other request of the process waiting, in a 2-worker load test.
        shape, limit = await run_in_threadpool(upload_limit, app.reference(entry))
        upload = await receive_upload(request, shape, limit)
        result = await run_in_threadpool(finish, app, request, user, entry, context, upload)
    except HTTPError as exc:
        return json_response(exc.status, {"detail": exc.detail, **exc.extra})
    finally:
        if upload is not None:
            remove_path(upload)
    return json_response(200, result)


async def save(request: Request) -> Response:
    def prepare(app, request, user):
        entry = app.entry(request.path_params["study_id"])
        base = _int_param(request, "base_version", required=True)
        confirm = request.query_params.get("confirm") in ("1", "true", "yes")
        _save_permission(app, user, entry, Action.SAVE_CONFIRMED if confirm else Action.SAVE)
        try:
            assists = assist_provenance(request.headers.get(ASSIST_HEADER), entry)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from exc
        return entry, (base, str(Stage.CONFIRMED if confirm else Stage.REFINED), assists)

    def finish(app, request, user, entry, context, upload):
        base, stage, assists = context
        return _write_version(
            app, request, user, entry, upload, stage, base, "save", assists=assists
        )

    return await _upload_endpoint(request, prepare, finish)


async def override(request: Request) -> Response:
    def prepare(app, request, user):
        refusal = policy.role_refusal(Action.OVERRIDE, user["role"])
        if refusal is not None:
            raise HTTPError.refused(refusal)
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


@api(Action.CONFIRM, json_body=True)
def confirm(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    base = payload.get("base_version")
    if not isinstance(base, int) or isinstance(base, bool) or base < 0:
        raise HTTPError(400, "base_version (the version you reviewed) is required")
    _save_permission(app, user, entry, Action.CONFIRM)
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


@api(Action.SEND_BACK, json_body=True)
def send_back(app, request, user, payload):
    entry = app.entry(request.path_params["study_id"])
    comment = payload.get("comment")
    if not isinstance(comment, str) or not comment.strip():
        raise HTTPError(400, "sending back needs a comment for the trainee")
    if len(comment) > MAX_COMMENT_CHARS:
        raise HTTPError(400, f"comment longer than {MAX_COMMENT_CHARS} characters")
    with db.connect(app.db_path) as con, db.transaction(con):
        app.decide(con, user, entry, Action.SEND_BACK)
        db.set_sent_back(con, entry.study_id, entry.patient_id, entry.batch, True)
        db.add_comment(con, entry.study_id, user["username"], user["role"], "send_back", comment)
        db.log_event(con, "send_back", user["username"], entry.study_id, ip=client_ip(request))
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


@api(Action.ADMINISTER, csrf=False)
def users(app, request, user, payload):
    with db.connect(app.db_path) as con:
        return {"users": db.list_users(con)}


@api(Action.ADMINISTER, json_body=True)
def assign(app, request, user, payload):
    username = payload.get("username")
    study_id, patient_id = payload.get("study_id"), payload.get("patient_id")
    if not isinstance(username, str) or (study_id is None) == (patient_id is None):
        raise HTTPError(400, "give username and one of study_id / patient_id")
    return {"assigned": assign_studies(app, username, study_id, patient_id, user["username"])}


@api(Action.ADMINISTER, json_body=True)
def assign_auto(app, request, user, payload):
    return {"assigned": auto_assign(app, user["username"])}


@api(Action.ADMINISTER, csrf=False)
def dashboard(app, request, user, payload):
    return dashboard_data(app)


@api(Action.ADMINISTER, csrf=False)
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
        user = await run_in_threadpool(session_user, app, request)
        if user is None:
            from urllib.parse import quote

            return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
        if check_study and app.catalog.get(request.path_params["study_id"]) is None:
            return PlainTextResponse("unknown study", status_code=404)
        return _page(page)

    return endpoint


def routes() -> list:
    """Every route of the server (``app.create_app`` adds the middleware)."""
    prefix = "/api/studies/{study_id}"
    return [
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
