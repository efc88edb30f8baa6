"""The review policy without HTTP: every role x status x action, and the study page's flags."""

import itertools

import pytest

from metsflow.review_server.policy import (
    Action,
    Kind,
    Role,
    Stage,
    Status,
    capabilities,
    decide,
    in_queue,
    role_refusal,
    status_of,
)

T, N, A = Role.TRAINEE, Role.NEURORADIOLOGIST, Role.ADMIN
OPEN = (Status.PENDING, Status.REFINED, Status.SENT_BACK)
# Who may do what to a study that is not confirmed (a trainee's own study, latest refined).
ALLOWED_OPEN = {
    Action.VIEW: {T, N, A},
    Action.SAVE: {T, N},
    Action.SAVE_CONFIRMED: {N},
    Action.CONFIRM: {N},
    Action.SEND_BACK: {N},
    Action.OVERRIDE: {A},
    Action.ADMINISTER: {A},
}
ALLOWED_CONFIRMED = {Action.VIEW: {T, N, A}, Action.OVERRIDE: {A}, Action.ADMINISTER: {A}}


@pytest.mark.parametrize(
    ("role", "status", "action"), list(itertools.product(Role, Status, Action))
)
def test_every_role_status_action_on_an_own_study(role, status, action):
    refusal = decide(action, role, status, mine=True, latest_stage=Stage.REFINED, study_id="S1")
    table = ALLOWED_CONFIRMED if status is Status.CONFIRMED else ALLOWED_OPEN
    if role in table.get(action, set()):
        assert refusal is None
        return
    assert refusal is not None and refusal.reason
    if role in ALLOWED_OPEN[action]:  # the role may, but not on a confirmed study: 409
        assert refusal.kind is Kind.CONFLICT and "S1 is confirmed" in refusal.reason
    else:
        assert refusal.kind is Kind.FORBIDDEN


@pytest.mark.parametrize(("status", "action"), list(itertools.product(Status, Action)))
def test_a_trainee_does_nothing_on_a_study_not_assigned_to_them(status, action):
    refusal = decide(action, T, status, mine=False, latest_stage=Stage.REFINED, study_id="S1")
    assert refusal is not None and refusal.kind is Kind.FORBIDDEN
    assert refusal.reason == "study S1 is not assigned to you"


def test_assignment_does_not_limit_other_roles():
    assert decide(Action.CONFIRM, N, Status.REFINED, mine=False, latest_stage="refined") is None
    assert decide(Action.OVERRIDE, A, Status.CONFIRMED, mine=False) is None


def test_confirm_needs_a_refined_latest_version():
    for latest in (None, Stage.CONFIRMED):
        refusal = decide(Action.CONFIRM, N, Status.PENDING, mine=False, latest_stage=latest)
        assert refusal is not None and refusal.kind is Kind.INVALID
        assert "no refined label" in refusal.reason
    # A neuroradiologist's own edit may be confirmed at once, refined or not.
    assert decide(Action.SAVE_CONFIRMED, N, Status.PENDING, mine=False) is None


def test_refusals_name_the_role_rule():
    assert role_refusal(Action.SAVE, A).reason.startswith("admins change labels only by override")
    assert role_refusal(Action.CONFIRM, T).reason == "only a neuroradiologist confirms"
    assert role_refusal(Action.OVERRIDE, N).reason == "only an admin overrides"
    assert role_refusal(Action.ADMINISTER, T).reason == "trainee may not do this (admin only)"
    with pytest.raises(ValueError):
        role_refusal(Action.VIEW, "superuser")


def test_status_from_stages_and_send_back():
    assert status_of(set(), False) is Status.PENDING
    assert status_of({"refined"}, False) is Status.REFINED
    assert status_of({"refined"}, True) is Status.SENT_BACK
    assert status_of({"refined", "confirmed"}, True) is Status.CONFIRMED


def test_queues():
    assert in_queue(T, Status.PENDING, mine=True) and not in_queue(T, Status.REFINED, mine=False)
    assert not in_queue(N, Status.PENDING, mine=False) and in_queue(N, Status.SENT_BACK, False)
    assert all(in_queue(A, s, mine=False) for s in Status)


def test_page_flags_follow_the_decisions():
    trainee = capabilities(T, Status.SENT_BACK, mine=True, latest_stage=Stage.REFINED)
    assert trainee == {
        "can_edit": True,
        "can_confirm": False,
        "can_send_back": False,
        "can_override": False,
        "save_stage": "refined",
    }
    neuro = capabilities(N, Status.REFINED, mine=False, latest_stage=Stage.REFINED)
    assert neuro["can_confirm"] and neuro["can_send_back"] and neuro["save_stage"] == "confirmed"
    done = capabilities(N, Status.CONFIRMED, mine=False, latest_stage=Stage.CONFIRMED)
    assert not any(done[k] for k in ("can_edit", "can_confirm", "can_send_back"))
    admin = capabilities(A, Status.CONFIRMED, mine=False, latest_stage=Stage.CONFIRMED)
    assert admin["can_override"] and not admin["can_edit"] and admin["save_stage"] is None
