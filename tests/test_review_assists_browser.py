"""Review assists in the browser (Playwright + Debian's chromium, as tests/test_review_browser.py):
a trainee opens a follow-up with possible lesions and a previous scan, accepts the top
suggestion with keys, selects the new lesion and deletes it, shows the previous T1c, saves;
the stored version has exactly those voxel changes and the decisions in its provenance.

The screenshot (suggestions, the lesion list with new / persisting / gone, the previous scan
beside this one) goes to the test's tmp_path, or ``$METSFLOW_TEST_ARTIFACTS`` when set
(docs/review_assists.png was made that way).
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _browser import (  # noqa: F401  (browser: a fixture)
    AXES,
    PASSWORD,
    SHAPE,
    SPACING_MM,
    Session,
    _next_frames,
    browser,
    serving,
    wait_for,
)
from _review_assists_data import FOLLOW_UP, PATIENT, write_assisted_batch
from _synthetic_images import oblique_affine, phantom, sample
from argon2 import PasswordHasher

from metsflow.active_learning.labelstore import LabelStore
from metsflow.core import labels
from metsflow.review_server import db

ARTIFACT_NAME = "review_assists.png"
CLINICAL_SHAPE = (240, 240, 155)  # 1 mm, as BraTS; the size the editor must handle
TINY = (40, 10, 26)  # a 2-voxel lesion inside the head, far from both lesions


def _assisted_batch(root: Path, shape, spacing_mm: float, tiny) -> dict:
    """The oblique P-I-L phantom of test_review_browser as a follow-up with assists."""
    world = phantom()
    affine = oblique_affine(spacing_mm, (10.0, -6.0, 8.0), shape, axes=AXES)
    t1c = sample(world["t1c"], world["affine"], affine, shape).astype(np.float32)
    flair = sample(world["t2"], world["affine"], affine, shape).astype(np.float32)
    brats = sample(world["label"].astype(np.float32), world["affine"], affine, shape, order=0)
    preseg = labels.to_internal(np.rint(brats).astype(np.uint8), "brats").astype(np.uint8)
    preseg[tiny[0], tiny[1], tiny[2] : tiny[2] + 2] = labels.ENHANCING  # new at the follow-up
    made = write_assisted_batch(root, t1c, flair, affine, preseg)
    template = root / "users.sqlite3"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db, "_HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        db.add_user(template, "tina", PASSWORD, "trainee")
    with db.connect(template) as con:
        for study in ("S01", FOLLOW_UP):
            db.set_assignment(con, study, PATIENT, "round_1", "tina")
    return {**made, "template": template, "preseg": preseg}


@pytest.fixture(scope="module")
def assisted(tmp_path_factory):
    return _assisted_batch(tmp_path_factory.mktemp("assists_browser"), SHAPE, SPACING_MM, TINY)


@pytest.fixture
def server(assisted, tmp_path):
    with serving(assisted["results"], assisted["template"], tmp_path / "labels") as served:
        yield served


def test_accept_a_suggestion_delete_a_lesion_and_save(server, browser, assisted, tmp_path):  # noqa: F811
    base_url, config = server
    trainee = Session(browser, base_url, "tina", start=f"/study/{FOLLOW_UP}")
    page = trainee.page
    wait_for(page, "document.body.dataset.assists === 'ready'")
    # Possible lesions, highest stage-2 score first.
    rows = page.locator("#suggestions li")
    assert rows.count() == 2
    assert "stage 2 0.41" in rows.nth(0).inner_text()
    assert "stage 2 0.12" in rows.nth(1).inner_text()
    # The lesion list against the previous scan: persisting lesions, the new 2-voxel one, and
    # the one that is gone.
    lesions = page.locator("#lesions button.lesion")
    texts = [lesions.nth(i).inner_text() for i in range(lesions.count())]
    assert sum("persisting" in t for t in texts) == 2 and "new" in texts[-1], texts
    assert page.locator("#gone li").count() == 1
    assert "confirmed label" in page.inner_text("#previous-info")

    # S jumps to the top suggestion, A accepts it (as enhancing).
    page.keyboard.press("s")
    page.keyboard.press("a")
    page.wait_for_selector("#suggestions li.accepted")
    # Select the new lesion (Navigate: jumping to it puts the crosshair in it) and delete it.
    lesions.nth(lesions.count() - 1).click()
    wait_for(page, "document.getElementById('selection').textContent.includes('2 voxels')")
    page.keyboard.press("x")
    # The previous T1c beside this one, at the same crosshair.
    page.keyboard.press("p")
    page.wait_for_selector("#previous-pane:not([hidden])")
    page.click("button.lesion[data-lesion-id='1']")
    _next_frames(page)
    same = page.evaluate(
        """() => { const a = window.metsflowEditor.nv; const b = window.metsflowEditor.assists.state.nvPrevious;
        const p = a.frac2mm(a.scene.crosshairPos); const q = b.frac2mm(b.scene.crosshairPos);
        return Math.hypot(p[0] - q[0], p[1] - q[1], p[2] - q[2]); }"""
    )
    assert same < 1e-3, f"the previous scan's crosshair is {same} mm away"
    page.keyboard.press("s")  # the undecided suggestion, for the screenshot
    _next_frames(page)
    artifact = Path(os.environ.get("METSFLOW_TEST_ARTIFACTS", tmp_path)) / ARTIFACT_NAME
    page.screenshot(path=str(artifact))
    print(f"assists screenshot: {artifact}")

    assert trainee.click("#save", "ok") == "Saved v1 (refined)."
    trainee.close()

    store = LabelStore(config.label_store)
    versions = store.versions(FOLLOW_UP)
    saved = np.asarray(nib.load(versions[-1]["path"]).dataobj)
    before = assisted["preseg"]
    expected = before.copy()
    expected[assisted["suggestion_a"]] = labels.ENHANCING
    expected[TINY[0], TINY[1], TINY[2] : TINY[2] + 2] = 0
    assert np.array_equal(saved, expected), np.argwhere(saved != expected)[:5]
    record = store.history(FOLLOW_UP)[-1]
    assert record["assists"]["suggestions"] == {"1": "accepted"}
    assert record["assists"]["edits"]["deleted"] == 1
    bins = record["assists"]["suggestions_by_size_bin"]
    assert sum(b["accepted"] for b in bins.values()) == 1


@pytest.mark.slow
def test_clinical_size_study_loads_and_saves(browser, tmp_path):  # noqa: F811
    """A 1 mm 240 x 240 x 155 follow-up with its assists (label, probability map, suggestions,
    previous label) opens, takes an accepted suggestion and saves exactly. Prints the first
    render (navigation to ready) and the save round trip; benchmarks/bench_review_load.py
    --clinical measures saves under load."""
    batch = _assisted_batch(tmp_path / "clinical", CLINICAL_SHAPE, 1.0, (150, 100, 60))
    with serving(batch["results"], batch["template"], tmp_path / "labels") as (base_url, config):
        trainee = Session(browser, base_url, "tina", start=f"/study/{FOLLOW_UP}")
        page = trainee.page
        wait_for(page, "document.body.dataset.assists === 'ready'", timeout_ms=300_000)
        # Stamped by the page itself (Playwright's polling waits while the page computes).
        first_render_s = int(page.evaluate("document.body.dataset.readyMs")) / 1000
        assists_s = int(page.evaluate("document.body.dataset.assistsMs")) / 1000
        marks = (
            "performance.getEntriesByType('mark').map(m => "
            "`${m.name.replace('metsflow:', '')} ${(m.startTime / 1000).toFixed(2)}`).join(', ')"
        )
        steps = page.evaluate(marks)
        page.keyboard.press("s")
        page.keyboard.press("a")
        page.wait_for_selector("#suggestions li.accepted")
        began = page.evaluate("performance.now()")
        assert trainee.click("#save", "ok") == "Saved v1 (refined)."
        save_s = (page.evaluate("performance.now()") - began) / 1000
        save_steps = page.evaluate(marks).split(", ")[len(steps.split(", ")) :]
        trainee.close()
        print(
            f"clinical size: first render {first_render_s:.2f} s ({steps} s), assists shown "
            f"{assists_s:.2f} s, save {save_s:.2f} s ({', '.join(save_steps)} s)"
        )
        saved = np.asarray(nib.load(LabelStore(config.label_store).latest(FOLLOW_UP)).dataobj)
    expected = batch["preseg"].copy()
    expected[batch["suggestion_a"]] = labels.ENHANCING
    assert np.array_equal(saved, expected)
