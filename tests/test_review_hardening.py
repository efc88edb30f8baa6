"""Review platform hardening (issue #25 parts 8 and 12): account rules, bounded `review`
command arguments, same-origin JSON-only POSTs (no login CSRF) and the Content-Security-Policy.

Imports only what existed before the hardening, so the file runs against the old code too.
"""

import io
import json
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from starlette.routing import Route
from starlette.testclient import TestClient

from metsflow.cli import main as cli_main
from metsflow.core.layout import Layout
from metsflow.review_server import db
from metsflow.review_server.app import create_app
from metsflow.review_server.config import ReviewConfig

PASSWORD = "correct horse battery"
HOST = "http://testserver"
EVIL = "https://evil.example"


@pytest.fixture(scope="module")
def review(tmp_path_factory):
    """An empty results folder with one exported review batch (round 1, manifest only) and
    a review database holding one trainee (cheap argon2 parameters)."""
    root = tmp_path_factory.mktemp("review")
    results, labels = root / "results", root / "labels"
    manifest = Path(Layout(results).review_manifest(1))
    manifest.parent.mkdir(parents=True)
    manifest.write_text("study_id\tpatient_id\n")
    config = ReviewConfig(results=results, label_store=labels)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db, "_HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        db.add_user(config.db_path, "tina", PASSWORD, "trainee")
    return config


@pytest.fixture(scope="module")
def app(review):
    return create_app(review)


def _cli(review, *argv, stdin="", monkeypatch=None):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    paths = ["--results", str(review.results), "--labels", str(review.label_store)]
    try:
        return cli_main(["review", *argv, *paths])
    except SystemExit as exc:  # argparse's usage errors
        return exc.code


# ---------------------------------------------------------------------- accounts (#25.8)


@pytest.mark.parametrize(
    ("name", "password", "problem"),
    [
        ("mallory\n", PASSWORD, "user name"),  # "$" of a .match() accepted the newline
        ("m" * 5000, PASSWORD, "user name"),
        ("..", PASSWORD, "user name"),
        ("eve", " " * 8, "not whitespace"),
        ("eve", "a b c d e f g", "not whitespace"),  # 7 characters that are not spaces
        ("eve", "pass\tword123", "control characters"),
        ("evelyn12", "EVELYN12", "not be the user name"),
    ],
)
def test_user_add_refuses_names_and_passwords_outside_the_rules(
    review, monkeypatch, capsys, name, password, problem
):
    argv = ("user", "add", name, "--role", "admin")
    code = _cli(review, *argv, stdin=password + "\n", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and problem in err and "Traceback" not in err
    with db.connect(review.db_path) as con:
        assert name not in {u["username"] for u in db.list_users(con)}


def test_user_add_lists_every_broken_rule_at_once(review, monkeypatch, capsys):
    argv = ("user", "add", "a b", "--role", "admin")
    assert _cli(review, *argv, stdin="  \n", monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "user name" in err and "password" in err


def test_user_add_help_states_the_rules(capsys):
    with pytest.raises(SystemExit):
        cli_main(["review", "user", "add", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "letters, digits and . _ -" in out and "not whitespace" in out


def test_a_good_account_is_still_added(review, monkeypatch, capsys):
    argv = ("user", "add", "dr.smith-2", "--role", "neuroradiologist")
    assert _cli(review, *argv, stdin="a long passphrase\n", monkeypatch=monkeypatch) == 0


# ---------------------------------------------------------------------- arguments (#25)


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("serve", "--port", "99999"), "--port: must be an integer from 1 to 65535"),
        (("serve", "--port", "0"), "--port: must be an integer from 1 to 65535"),
        (("export-times", "--out", "x.tsv", "--round", "-3"), "--round: must be an integer"),
        (("assign", "--round", "7"), "round 7 has no review batch"),
        (("export-times", "--out", "x.tsv", "--round", "7"), "rounds with one: 1"),
    ],
)
def test_review_commands_refuse_out_of_range_numbers(review, monkeypatch, capsys, argv, says):
    code = _cli(review, *argv, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2 and says in err and "Traceback" not in err


# ---------------------------------------------------------------------- web (#25.12)


def _login(client, **kwargs):
    return client.post("/api/login", **kwargs)


def test_login_csrf_a_cross_site_form_cannot_sign_a_browser_in(app):
    client = TestClient(app)
    body = json.dumps({"username": "tina", "password": PASSWORD})
    plain = {"Content-Type": "text/plain"}
    # What a form on another site sends (enctype=text/plain, the browser adds its Origin).
    answer = _login(client, content=body, headers={**plain, "Origin": EVIL})
    assert answer.status_code == 403 and "set-cookie" not in answer.headers
    # Same-origin but not JSON: refused by type.
    answer = _login(client, content=body, headers={**plain, "Origin": HOST})
    assert answer.status_code == 415 and "set-cookie" not in answer.headers
    json_login = {"username": "tina", "password": PASSWORD}
    for headers in ({"Origin": EVIL}, {"Origin": "null"}, {}, {"Referer": EVIL + "/x"}):
        answer = _login(client, json=json_login, headers=headers)
        assert answer.status_code == 403, headers
    assert _login(client, json=json_login, headers={"Origin": HOST}).status_code == 200
    # Without an Origin, a same-origin Referer (Referrer-Policy: same-origin) is enough.
    assert _login(client, json=json_login, headers={"Referer": HOST + "/login"}).status_code == 200


def test_every_post_route_needs_same_origin_and_a_json_or_upload_type(app):
    client = TestClient(app)
    posts = [
        r.path.replace("{study_id}", "S1")
        for r in app.routes
        if isinstance(r, Route) and "POST" in r.methods
    ]
    assert len(posts) >= 10
    for path in posts:
        answer = client.post(path, json={}, headers={"Origin": EVIL})
        assert answer.status_code == 403, path
        form = {"Origin": HOST, "Content-Type": "application/x-www-form-urlencoded"}
        assert client.post(path, content=b"a=1", headers=form).status_code == 415, path


def test_json_endpoints_refuse_other_types_even_with_a_session(app):
    client = TestClient(app, headers={"Origin": HOST})
    token = _login(client, json={"username": "tina", "password": PASSWORD}).json()["csrf_token"]
    client.headers["X-CSRF-Token"] = token
    answer = client.post("/api/logout", content=b"{}", headers={"Content-Type": "application/gzip"})
    assert answer.status_code == 415
    assert client.post("/api/logout", json={}).status_code == 200


@pytest.mark.parametrize("path", ["/login", "/api/me", "/static/common.js", "/nowhere"])
def test_a_strict_content_security_policy_is_sent(app, path):
    answer = TestClient(app).get(path, follow_redirects=False)
    policy = dict(
        d.strip().split(" ", 1) for d in answer.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert "blob:" in policy["worker-src"] and policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in answer.headers["content-security-policy"]
