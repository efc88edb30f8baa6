"""The review server's own state in SQLite: users, sessions, assignments, audit log, comments.

Labels are NOT here: the label store is the only place labels live. This file holds who may do
what, who works on which study, and what happened (logins, opens, saves, confirmations, send
backs, reassignments, overrides), so the dashboard can report time per study.

The database lives next to the label store folder (``review_db_path``), never inside it: the
store's guard refuses any write there except a label import.

Concurrency: WAL journal (readers never block the writer), one connection per request/thread
(``connect``), ``busy_timeout`` so concurrent writers queue instead of failing, and
``BEGIN IMMEDIATE`` for read-then-write steps so two requests cannot interleave them.
WAL keeps its index in shared memory, so every process using the file (the server and the
``metsflow review`` commands) must run on one host -- a label store on a cluster filesystem is
fine as long as they do.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import secrets
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from metsflow.review_server.policy import Role, account_problems

ROLES = tuple(str(role) for role in Role)
DB_SUFFIX = ".review.sqlite3"
SESSION_HOURS = 12
# Login throttle: this many failures for one user name from one address within the window
# answer 429 (even a right password) until the window has passed.
LOGIN_FAILURES_ALLOWED = 5
LOGIN_WINDOW_S = 60.0
# Writers wait this long for the SQLite write lock before failing (a save holds it for
# milliseconds; 20 reviewers never come close).
BUSY_TIMEOUT_MS = 30_000

_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the user name does not exist, so an unknown name takes as long as
    a wrong password (no user enumeration by timing). Made on first use, not at import (one
    hash costs ~0.1-0.5 s, and ``metsflow al status`` imports this module)."""
    return PasswordHasher().hash("metsflow-no-such-user")


SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL REFERENCES users(username),
    csrf_token TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    study_id TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    batch TEXT NOT NULL,
    username TEXT,
    sent_back INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    username TEXT,
    ip TEXT,
    kind TEXT NOT NULL,
    study_id TEXT,
    version INTEGER,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS events_by_study ON events(study_id, kind, username, at);
CREATE INDEX IF NOT EXISTS events_by_login ON events(kind, username, ip, at);
CREATE TABLE IF NOT EXISTS comments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    study_id TEXT NOT NULL,
    username TEXT NOT NULL,
    role TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL
);
"""


class ReviewDBError(ValueError):
    """A refused account or assignment operation (message says why)."""


def review_db_path(label_store: str | os.PathLike) -> Path:
    """The review database of a label store: ``<store>.review.sqlite3`` beside the store folder
    (``labels/`` -> ``labels.review.sqlite3``), outside the folder the store guards."""
    store = Path(os.path.abspath(label_store))
    return store.with_name(store.name + DB_SUFFIX)


def iso(timestamp: float | None = None) -> str:
    moment = _dt.datetime.fromtimestamp(
        time.time() if timestamp is None else timestamp, _dt.timezone.utc
    )
    return moment.isoformat(timespec="seconds")


def init_db(path: str | os.PathLike) -> Path:
    """Create the tables (idempotent) and switch the file to WAL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        con.commit()
    finally:
        con.close()
    os.chmod(path, 0o600)  # password hashes and session hashes: owner only
    return path


@contextlib.contextmanager
def connect(path: str | os.PathLike) -> Iterator[sqlite3.Connection]:
    """One connection for one request/thread; committed on success, rolled back on error."""
    con = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    con.row_factory = sqlite3.Row
    con.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    # WAL + NORMAL: a commit does not wait for fsync; a power cut may drop the last audit
    # events but never corrupts the file. Labels and their provenance are in the label store,
    # which fsyncs every version and history line.
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute("PRAGMA foreign_keys=ON")
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: takes the write lock up front (no upgrade deadlock)."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# ---------------------------------------------------------------------- users


def add_user(db: str | os.PathLike, username: str, password: str, role: str) -> None:
    """Create an account (the password is stored as an argon2id hash); the name and password
    follow ``policy.ACCOUNT_RULES`` (every broken rule is listed at once)."""
    problems = account_problems(username, password, role)
    if problems:
        raise ReviewDBError("; ".join(problems))
    init_db(db)
    with connect(db) as con, transaction(con):
        if con.execute("SELECT 1 FROM users WHERE username=?", (username,)).fetchone():
            raise ReviewDBError(f"user {username} already exists")
        con.execute(
            "INSERT INTO users(username, role, password_hash, created_at) VALUES (?,?,?,?)",
            (username, role, _HASHER.hash(password), iso()),
        )


def list_users(con: sqlite3.Connection) -> list[dict]:
    rows = con.execute("SELECT username, role, created_at FROM users ORDER BY role, username")
    return [dict(r) for r in rows]


def user_role(con: sqlite3.Connection, username: str) -> str | None:
    row = con.execute("SELECT role FROM users WHERE username=?", (username,)).fetchone()
    return None if row is None else row["role"]


def verify_password(con: sqlite3.Connection, username: str, password: str) -> str | None:
    """The user's role if the password is right, else None (same cost for unknown names)."""
    row = con.execute("SELECT password_hash, role FROM users WHERE username=?", (username,))
    row = row.fetchone()
    try:
        _HASHER.verify(row["password_hash"] if row else _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    return row["role"] if row else None


# ---------------------------------------------------------------------- sessions


def _token_hash(token: str) -> str:
    # Only a hash of the cookie is stored: a copy of the database does not log anyone in.
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(con: sqlite3.Connection, username: str) -> tuple[str, str]:
    """A new random session id (never one the client sent: no fixation) and its CSRF token."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    now = time.time()
    with transaction(con):
        con.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
        con.execute(
            "INSERT INTO sessions(token_hash, username, csrf_token, created_at, expires_at) "
            "VALUES (?,?,?,?,?)",
            (_token_hash(token), username, csrf, now, now + SESSION_HOURS * 3600),
        )
    return token, csrf


def session_user(con: sqlite3.Connection, token: str | None) -> dict | None:
    """``{username, role, csrf_token}`` of a live session, or None."""
    if not token:
        return None
    row = con.execute(
        "SELECT s.username, u.role, s.csrf_token FROM sessions s JOIN users u "
        "ON u.username = s.username WHERE s.token_hash=? AND s.expires_at > ?",
        (_token_hash(token), time.time()),
    ).fetchone()
    return None if row is None else dict(row)


def delete_session(con: sqlite3.Connection, token: str | None) -> None:
    if token:
        with transaction(con):
            con.execute("DELETE FROM sessions WHERE token_hash=?", (_token_hash(token),))


# ---------------------------------------------------------------------- audit log


def log_event(
    con: sqlite3.Connection,
    kind: str,
    username: str | None = None,
    study_id: str | None = None,
    version: int | None = None,
    ip: str | None = None,
    at: float | None = None,
    **detail,
) -> None:
    con.execute(
        "INSERT INTO events(at, username, ip, kind, study_id, version, detail) "
        "VALUES (?,?,?,?,?,?,?)",
        (
            time.time() if at is None else at,
            username,
            ip,
            kind,
            study_id,
            version,
            json.dumps(detail, sort_keys=True, default=str) if detail else None,
        ),
    )


def recent_login_failures(con: sqlite3.Connection, username: str, ip: str) -> int:
    """Failed and still undecided logins of ``username`` from ``ip`` within the window."""
    row = con.execute(
        "SELECT COUNT(*) AS n FROM events WHERE kind IN ('login_fail', 'login_pending') "
        "AND username=? AND ip=? AND at > ?",
        (username, ip, time.time() - LOGIN_WINDOW_S),
    ).fetchone()
    return int(row["n"])


def begin_login(con: sqlite3.Connection, username: str, ip: str) -> int | None:
    """Reserve one login attempt: its event id, or None when the name and address are
    throttled (``LOGIN_FAILURES_ALLOWED`` failed or undecided attempts in the window). The
    count and the reservation are one write transaction, and an undecided attempt counts as a
    failure: checked then logged after the password (~0.1-0.5 s of argon2), concurrent guesses
    -- threads of one server, or its worker processes -- all passed the check before the first
    failure was written. An attempt whose process died stays counted until the window passes."""
    with transaction(con):
        if recent_login_failures(con, username, ip) >= LOGIN_FAILURES_ALLOWED:
            log_event(con, "login_throttled", username, ip=ip)
            return None
        log_event(con, "login_pending", username, ip=ip)
        return int(con.execute("SELECT last_insert_rowid()").fetchone()[0])


def end_login(con: sqlite3.Connection, attempt: int, succeeded: bool) -> None:
    """Decide a reserved attempt: it becomes a ``login`` or a ``login_fail`` event."""
    kind = "login" if succeeded else "login_fail"
    con.execute("UPDATE events SET kind=? WHERE id=?", (kind, attempt))


def last_open(con: sqlite3.Connection, username: str, study_id: str) -> float | None:
    """When ``username`` last opened ``study_id`` after their last save of it (the running
    timer), or None."""
    row = con.execute(
        "SELECT MAX(at) AS at FROM events WHERE study_id=? AND username=? AND kind='open' "
        "AND at > COALESCE((SELECT MAX(at) FROM events WHERE study_id=? AND username=? "
        "AND kind IN ('save', 'confirm', 'override')), 0)",
        (study_id, username, study_id, username),
    ).fetchone()
    return None if row is None or row["at"] is None else float(row["at"])


def events(con: sqlite3.Connection, kinds: tuple[str, ...]) -> list[dict]:
    marks = ",".join("?" * len(kinds))
    rows = con.execute(
        f"SELECT at, username, kind, study_id, version, detail FROM events "
        f"WHERE kind IN ({marks}) ORDER BY at, id",
        kinds,
    )
    result = []
    for row in rows:
        record = dict(row)
        record["detail"] = json.loads(record["detail"]) if record["detail"] else {}
        result.append(record)
    return result


# ---------------------------------------------------------------------- comments


def add_comment(
    con: sqlite3.Connection, study_id: str, username: str, role: str, kind: str, text: str
) -> None:
    con.execute(
        "INSERT INTO comments(at, study_id, username, role, kind, text) VALUES (?,?,?,?,?,?)",
        (time.time(), study_id, username, role, kind, text),
    )


def comments(con: sqlite3.Connection, study_id: str) -> list[dict]:
    rows = con.execute(
        "SELECT at, username, role, kind, text FROM comments WHERE study_id=? ORDER BY at, id",
        (study_id,),
    )
    return [
        {
            "author": r["username"],
            "role": r["role"],
            "kind": r["kind"],
            "text": r["text"],
            "created_at": iso(r["at"]),
        }
        for r in rows
    ]


# ---------------------------------------------------------------------- assignments


def assignments(con: sqlite3.Connection) -> dict[str, dict]:
    rows = con.execute("SELECT study_id, patient_id, batch, username, sent_back FROM assignments")
    return {r["study_id"]: dict(r) for r in rows}


def set_assignment(
    con: sqlite3.Connection, study_id: str, patient_id: str, batch: str, username: str | None
) -> None:
    con.execute(
        "INSERT INTO assignments(study_id, patient_id, batch, username, sent_back, updated_at) "
        "VALUES (?,?,?,?,0,?) ON CONFLICT(study_id) DO UPDATE SET username=excluded.username, "
        "patient_id=excluded.patient_id, batch=excluded.batch, updated_at=excluded.updated_at",
        (study_id, patient_id, batch, username, iso()),
    )


def set_sent_back(
    con: sqlite3.Connection, study_id: str, patient_id: str, batch: str, value: bool
) -> None:
    con.execute(
        "INSERT INTO assignments(study_id, patient_id, batch, username, sent_back, updated_at) "
        "VALUES (?,?,?,NULL,?,?) ON CONFLICT(study_id) DO UPDATE SET "
        "sent_back=excluded.sent_back, updated_at=excluded.updated_at",
        (study_id, patient_id, batch, int(value), iso()),
    )


# ---------------------------------------------------------------------- al status


def progress_line(label_store: str | os.PathLike) -> str:
    """One line for ``metsflow al status`` on the web review (empty if no server was set up):
    studies assigned and to how many trainees, sent back, saves/confirmations made in the
    browser and the median review time. Opens the database read-only."""
    path = review_db_path(label_store)
    if not path.is_file():
        return ""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
    con.row_factory = sqlite3.Row
    try:
        assigned = con.execute(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT username) AS people, "
            "COALESCE(SUM(sent_back), 0) AS back FROM assignments WHERE username IS NOT NULL"
        ).fetchone()
        saves = events(con, ("save", "confirm", "override"))
    except sqlite3.Error as exc:
        return f"web review: database unreadable ({exc})\n"
    finally:
        con.close()
    times = [
        float(e["detail"]["review_seconds"])
        for e in saves
        if e["detail"].get("review_seconds") is not None
    ]
    confirmed = sum(1 for e in saves if e["detail"].get("stage") == "confirmed")
    line = (
        f"web review: {assigned['n']} studies assigned to {assigned['people']} trainees, "
        f"{assigned['back']} sent back; {len(saves) - confirmed} refined and {confirmed} "
        "confirmed saves in the browser"
    )
    if times:
        line += f", median review time {statistics.median(times):.0f} s"
    if saves:
        line += f", last at {iso(saves[-1]['at'])}"
    return line + "\n"
