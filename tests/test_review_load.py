"""20 concurrent reviewers saving a 150-study batch against a real uvicorn server, one process
and two worker processes: every save is accounted for in the label store, no 5xx, and each study
ends with exactly one confirmed version although four neuroradiologists race to confirm every
study (tiny 8^3 volumes, so it takes seconds; benchmarks/bench_review_load.py reports the
figures at 24^3 and 1 mm). Login throttling holds across worker processes."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_review_load", REPO / "benchmarks" / "bench_review_load.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_review_load", module)
    spec.loader.exec_module(module)
    return module


def _race(tmp_path, studies: int, workers: int = 1) -> dict:
    """20 trainees save ``studies`` studies at once, then 4 neuroradiologists race to confirm
    each; every save is kept, one confirmation per study, the other three refused (409)."""
    figures = _bench().run(
        tmp_path, reviewers=20, neuroradiologists=4, studies=studies, shape=8,
        cheap_passwords=True, workers=workers,
    )  # fmt: skip
    assert figures["client_errors"] == []
    assert figures["server_errors_5xx"] == 0
    assert figures["saves_attempted"] == figures["saves_ok"] == studies
    assert figures["confirms_ok"] == studies and figures["confirms_attempted"] == 4 * studies
    assert figures["conflicts_409"] == 3 * studies
    assert figures["versions_in_store"] == 2 * studies == figures["saves_accounted"]
    assert figures["lost_saves"] == 0
    assert figures["studies_with_one_confirmed"] == studies
    return figures


def test_twenty_reviewers_save_150_studies_without_loss_or_server_error(tmp_path):
    _race(tmp_path, 150)


def test_two_worker_processes_keep_every_save_and_one_confirmation_per_study(tmp_path):
    """The same races against ``metsflow review serve --workers 2``: the saves and the racing
    confirmations now meet in two processes, through the label store's per-study lock and the
    SQLite file, and both workers serve them. 40 studies, not 150: the same races (20 reviewers,
    4 neuroradiologists per study) for a quarter of the 30 s the 150 took in the suite."""
    figures = _race(tmp_path, 40, workers=2)
    # A supervisor that only waits, and two workers that both served saves.
    busy = [cpu for cpu in figures["server_cpu_s_by_process"] if cpu > 0.05]
    assert len(busy) >= 2, figures["server_cpu_s_by_process"]


def test_concurrent_wrong_passwords_across_workers_are_throttled_after_five(tmp_path):
    """Twelve wrong passwords for one account from one address at the same moment, served by
    two worker processes: five are checked (401) and seven refused (429), as one at a time. A
    check-then-log throttle let every one through while the first was still hashing."""
    import threading

    import httpx

    from metsflow.review_server import db

    bench = _bench()
    results, labels = tmp_path / "results", tmp_path / "labels"
    bench.write_review_batch(results, 1, 8, durable=False)
    db.add_user(db.review_db_path(labels), "alice", bench.PASSWORD, "trainee")
    statuses, start = [], threading.Barrier(12)

    def guess(url):
        with httpx.Client(base_url=url, timeout=60, headers={"Origin": url}) as client:
            start.wait()
            answer = client.post("/api/login", json={"username": "alice", "password": "wrong-1"})
            statuses.append(answer.status_code)

    with bench.running_server(results, labels, bench.free_port(), workers=2) as (url, _):
        threads = [threading.Thread(target=guess, args=(url,)) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert sorted(statuses) == [401] * db.LOGIN_FAILURES_ALLOWED + [429] * 7
    with db.connect(db.review_db_path(labels)) as con:
        kinds = [e["kind"] for e in db.events(con, ("login_fail", "login_pending"))]
    assert kinds == ["login_fail"] * db.LOGIN_FAILURES_ALLOWED
