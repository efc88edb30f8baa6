"""Who may do what to a study: roles, stages and statuses as enums, and one decision function.

Pure (no HTTP, no database): ``decide(action, role, status, mine=..., latest_stage=...)``
answers ``None`` (allowed) or a ``Refusal`` naming the reason and its kind. The server maps
a refusal's kind to its HTTP status (403 / 409 / 400) and derives the study page's
``can_*`` flags from the same function, so the buttons a browser shows and the requests the
server accepts cannot disagree. The label store still refuses any version after a confirmed
one under its per-study lock; this module decides earlier, with a reason a person can read.

The rules (tests/test_review_policy.py walks every role x status x action):
- a trainee sees and works on only the studies assigned to them, and saves ``refined``;
- a neuroradiologist sees every study, saves ``refined`` or ``confirmed``, confirms the
  latest refined version unchanged, or sends a study back with a comment;
- an admin sees everything, assigns, reads the dashboard, and changes a label only by an
  override (with a reason), which is the one act allowed on a confirmed study.

Accounts (``account_problems``, stated to users as ``ACCOUNT_RULES``): a user name is 1-64
letters, digits and ``. _ -``, starting with a letter or digit (it appears in file names,
audit rows and TSV cells, so no whitespace, control or path characters); a password has at
least 8 characters that are not whitespace, at most 1,024 characters (argon2 hashes any
length; the bound keeps a request small), no control characters, and is not the user name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, StrEnum


class Role(StrEnum):
    TRAINEE = "trainee"
    NEURORADIOLOGIST = "neuroradiologist"
    ADMIN = "admin"


class Stage(StrEnum):
    """A label version's stage in the label store (the pre-segmentation is version 0)."""

    REFINED = "refined"
    CONFIRMED = "confirmed"


class Status(StrEnum):
    """A study's review status, from its label versions and whether it was sent back."""

    PENDING = "pending"
    REFINED = "refined"
    SENT_BACK = "sent_back"
    CONFIRMED = "confirmed"


class Action(StrEnum):
    VIEW = "view"  # open, read images/labels, comment
    SAVE = "save"  # a new refined version
    SAVE_CONFIRMED = "save_confirmed"  # a new version, confirmed at once
    CONFIRM = "confirm"  # the latest refined version, unchanged
    SEND_BACK = "send_back"
    OVERRIDE = "override"  # a new confirmed version over a confirmed one, with a reason
    ADMINISTER = "administer"  # accounts, assignment, dashboard


class Kind(Enum):
    """What sort of refusal; the value is the HTTP status the server answers with."""

    FORBIDDEN = 403
    CONFLICT = 409
    INVALID = 400


@dataclass(frozen=True)
class Refusal:
    reason: str
    kind: Kind = Kind.FORBIDDEN


ALLOWED_ROLES: dict[Action, frozenset[Role]] = {
    Action.VIEW: frozenset(Role),
    Action.SAVE: frozenset({Role.TRAINEE, Role.NEURORADIOLOGIST}),
    Action.SAVE_CONFIRMED: frozenset({Role.NEURORADIOLOGIST}),
    Action.CONFIRM: frozenset({Role.NEURORADIOLOGIST}),
    Action.SEND_BACK: frozenset({Role.NEURORADIOLOGIST}),
    Action.OVERRIDE: frozenset({Role.ADMIN}),
    Action.ADMINISTER: frozenset({Role.ADMIN}),
}
_ROLE_REASONS = {
    (Action.SAVE, Role.ADMIN): "admins change labels only by override (with a reason)",
    (Action.SAVE_CONFIRMED, Role.ADMIN): "admins change labels only by override (with a reason)",
    (Action.SAVE_CONFIRMED, Role.TRAINEE): "only a neuroradiologist confirms",
    (Action.CONFIRM, Role.TRAINEE): "only a neuroradiologist confirms",
    (Action.OVERRIDE, Role.TRAINEE): "only an admin overrides",
    (Action.OVERRIDE, Role.NEURORADIOLOGIST): "only an admin overrides",
}
# Acts that write a label or a review decision: none is allowed once a study is confirmed.
_CLOSED_BY_CONFIRMATION = frozenset(
    {Action.SAVE, Action.SAVE_CONFIRMED, Action.CONFIRM, Action.SEND_BACK}
)
# The queue puts first what each role acts on (then the rest; patients together).
QUEUE_FIRST: dict[Role, tuple[Status, ...]] = {
    Role.TRAINEE: (Status.SENT_BACK, Status.PENDING),
    Role.NEURORADIOLOGIST: (Status.REFINED,),
    Role.ADMIN: (),
}


def status_of(stages: set[str], sent_back: bool) -> Status:
    """A study's status from the stages of its label versions and its sent-back flag."""
    if Stage.CONFIRMED in stages:
        return Status.CONFIRMED
    if sent_back:
        return Status.SENT_BACK
    if Stage.REFINED in stages:
        return Status.REFINED
    return Status.PENDING


def role_refusal(action: Action, role: Role | str) -> Refusal | None:
    """Whether ``role`` may do ``action`` at all (whatever the study)."""
    role = Role(role)
    allowed = ALLOWED_ROLES[action]
    if role in allowed:
        return None
    reason = _ROLE_REASONS.get((action, role))
    if reason is None:
        reason = f"{role} may not do this ({', '.join(sorted(allowed))} only)"
    return Refusal(reason)


def decide(
    action: Action,
    role: Role | str,
    status: Status | str,
    *,
    mine: bool,
    latest_stage: Stage | str | None = None,
    study_id: str = "the study",
) -> Refusal | None:
    """``None`` if ``role`` may do ``action`` on a study in ``status``, else the refusal.

    ``mine``: the study is assigned to this user; ``latest_stage``: the stage of its newest
    label version (None: only the pre-segmentation)."""
    role, status = Role(role), Status(status)
    if role is Role.TRAINEE and not mine:
        return Refusal(f"study {study_id} is not assigned to you")
    refused = role_refusal(action, role)
    if refused is not None:
        return refused
    if action in _CLOSED_BY_CONFIRMATION and status is Status.CONFIRMED:
        return Refusal(
            f"study {study_id} is confirmed: read-only (an admin may override)", Kind.CONFLICT
        )
    if action is Action.CONFIRM and latest_stage != Stage.REFINED:
        return Refusal(f"study {study_id} has no refined label to confirm", Kind.INVALID)
    return None


def editor_stage(role: Role | str) -> Stage:
    """The stage the editor's Save button writes for ``role``: a neuroradiologist's edit is
    their confirmation, a trainee's is a refinement."""
    return Stage.REFINED if Role(role) is Role.TRAINEE else Stage.CONFIRMED


def in_queue(role: Role | str, status: Status | str, mine: bool) -> bool:
    """Whether the study is listed in ``role``'s queue: a trainee's own studies; for a
    neuroradiologist everything a trainee has touched; for an admin everything."""
    role = Role(role)
    if role is Role.TRAINEE:
        return mine
    if role is Role.NEURORADIOLOGIST:
        return Status(status) is not Status.PENDING
    return True


def capabilities(
    role: Role | str, status: Status | str, *, mine: bool, latest_stage: Stage | str | None
) -> dict:
    """The study page's flags, each the answer of ``decide`` for that act."""

    def may(action: Action) -> bool:
        return decide(action, role, status, mine=mine, latest_stage=latest_stage) is None

    can_edit = may(Action.SAVE)
    return {
        "can_edit": can_edit,
        "can_confirm": may(Action.CONFIRM),
        "can_send_back": may(Action.SEND_BACK),
        "can_override": may(Action.OVERRIDE),
        "save_stage": str(editor_stage(role)) if can_edit else None,
    }


MAX_USERNAME_CHARS = 64
MIN_PASSWORD_CHARS = 8  # not counting whitespace: eight spaces are no password
MAX_PASSWORD_CHARS = 1024
# fullmatch, not match: "$" would accept a trailing newline ("mallory\n").
USERNAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_USERNAME_CHARS - 1}}}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
ACCOUNT_RULES = (
    f"user names: 1-{MAX_USERNAME_CHARS} letters, digits and . _ - (first a letter or digit); "
    f"passwords: at least {MIN_PASSWORD_CHARS} characters that are not whitespace, at most "
    f"{MAX_PASSWORD_CHARS}, no control characters, not the user name"
)


def username_ok(username: object) -> bool:
    return isinstance(username, str) and USERNAME.fullmatch(username) is not None


def account_problems(username: object, password: object, role: object) -> list[str]:
    """Every way the account breaks the rules (empty: fine), each in words."""
    problems = []
    if not username_ok(username):
        shown = repr(username)[:40] + ("..." if len(repr(username)) > 40 else "")
        problems.append(
            f"user name {shown} must be 1-{MAX_USERNAME_CHARS} letters, digits and . _ - "
            "(first a letter or digit)"
        )
    if role not in tuple(Role):
        problems.append(f"role must be one of {', '.join(Role)}, got {role!r}")
    if not isinstance(password, str):
        problems.append("a password is required")
        return problems
    if len("".join(password.split())) < MIN_PASSWORD_CHARS:
        problems.append(
            f"password must have at least {MIN_PASSWORD_CHARS} characters that are not whitespace"
        )
    if len(password) > MAX_PASSWORD_CHARS:
        problems.append(f"password must have at most {MAX_PASSWORD_CHARS} characters")
    if _CONTROL.search(password):
        problems.append("password must not contain control characters (newline, tab, ...)")
    if isinstance(username, str) and password.strip().lower() == username.lower():
        problems.append("password must not be the user name")
    return problems
