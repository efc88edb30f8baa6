"""Browser tests of the review platform: Playwright (Python) drives Debian's ``chromium``
(headless, WebGL2 in software through SwiftShader) against the real ``metsflow.review_server``
app served by uvicorn on 127.0.0.1 over a synthetic round-1 batch.

The T1c is deliberately neither RAS nor axis-aligned (voxel axes P, I, L, rotated ~14 degrees):
NiiVue reorients to RAS internally, so a stroke painted with the mouse must come back in the
file's own voxel order on the exact T1c grid, where NiiVue showed it.

The editor screenshot (with the label overlay) is written to the test's tmp_path, or to
``$METSFLOW_TEST_ARTIFACTS`` when set (docs/review_editor.png was made that way).

Nothing here skips: no Chromium or no NiiVue bundle is a failure that says what to install
(``./test.sh`` installs both on a fresh machine).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import uvicorn
from _browser import (  # noqa: F401  (browser: a fixture)
    AXES,
    PASSWORD,
    SHAPE,
    SPACING_MM,
    STUDY,
    USERS,
    Session,
    _next_frames,
    browser,
    wait_for,
)
from _synthetic_images import LESIONS, oblique_affine, phantom, sample, save
from argon2 import PasswordHasher
from playwright.sync_api import Page

from metsflow.active_learning.labelstore import LabelStore
from metsflow.active_learning.review import LABEL_COLOURS, export_batch
from metsflow.core import labels
from metsflow.core.layout import PRESEGMENTATION_NAME
from metsflow.review_server import db
from metsflow.review_server.app import create_app
from metsflow.review_server.config import ReviewConfig

PATIENT = "P01"
FOLLOW_UP = "S02"  # the same patient's next study (same images): the queue's next item
ARTIFACT_NAME = "review_editor.png"


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """results/ with a round-1 review package of one patient's two studies (the same images:
    oblique PIL T1c, FLAIR, a pre-segmentation with two lesions and a 2-voxel one the size rule
    flags uncertain)."""
    root = tmp_path_factory.mktemp("browser")
    world = phantom()
    affine = oblique_affine(SPACING_MM, (10.0, -6.0, 8.0), SHAPE, axes=AXES)
    native = root / "native"
    native.mkdir()
    t1c = save(native / "t1c.nii.gz", sample(world["t1c"], world["affine"], affine, SHAPE), affine)
    flair = save(
        native / "flair.nii.gz", sample(world["t2"], world["affine"], affine, SHAPE), affine
    )
    brats = sample(world["label"].astype(np.float32), world["affine"], affine, SHAPE, order=0)
    preseg = labels.to_internal(np.rint(brats).astype(np.uint8), "brats").astype(np.uint8)
    tiny = (40, 10, 26)  # inside the head, far from both lesions
    preseg[tiny[0], tiny[1], tiny[2] : tiny[2] + 2] = labels.ENHANCING
    pred = save(native / "pred_native.nii.gz", preseg, affine, dtype=np.uint8)
    results = root / "results"
    studies = [STUDY, FOLLOW_UP]
    exported = export_batch(
        studies,
        dict.fromkeys(studies, {"t1c": t1c, "flair": flair}),
        dict.fromkeys(studies, pred),
        results / "rounds" / "round_1" / "review",
        1,
        "round_0/model",
        patient_for=dict.fromkeys(studies, PATIENT),
    )
    assert list(exported["result"]) == ["exported"] * 2, exported.to_dict("records")
    template = root / "users.sqlite3"
    # Cheap argon2 parameters for the test accounts (verification follows each hash's own):
    # a login costs ~1 ms instead of ~0.5 s on a loaded machine.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db, "_HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
        for name, role in USERS.items():
            db.add_user(template, name, PASSWORD, role)
    return results, template


@pytest.fixture
def server(batch, tmp_path):
    """The real review app under uvicorn on 127.0.0.1 (a free port), in a thread."""
    results, template = batch
    config = ReviewConfig(results=results, label_store=tmp_path / "labels")
    shutil.copy(template, config.db_path)
    uv = uvicorn.Server(
        uvicorn.Config(
            create_app(config), host="127.0.0.1", port=0, log_level="warning", lifespan="off"
        )
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", config
    uv.should_exit = True
    thread.join(timeout=10)


def _paint(page: Page, pen: int, path: list[tuple[float, float]]) -> list:
    """Axial view, crosshair on the largest lesion, one mouse drag with ``pen`` through
    ``path`` (pixel offsets from the crosshair). Returns the world mm (true affine) of the
    path's mean. Screen <-> volume positions come from NiiVue's own (internal) helpers
    frac2canvasPos / canvasPos2frac: the NiiVue version is pinned by package-lock.json."""
    page.click("button.view[data-view=axial]")
    page.click("button.lesion[data-lesion-id='1']")
    page.click(f".tool[data-pen='{pen}']")
    _next_frames(page)
    x, y = page.evaluate(
        """() => { const nv = window.metsflowEditor.nv; const box = nv.canvas.getBoundingClientRect();
        const scale = nv.canvas.width / box.width; const xy = nv.frac2canvasPos(nv.scene.crosshairPos);
        return [box.left + xy[0] / scale, box.top + xy[1] / scale]; }"""
    )
    points = [(x + dx, y + dy) for dx, dy in path]
    page.mouse.move(*points[0])
    page.mouse.down()
    # NiiVue joins successive mouse positions with a line: a few moves make a continuous
    # stroke, and each one redraws the canvas (in software here).
    for point in points[1:]:
        page.mouse.move(*point)
    page.mouse.up()
    centre = np.mean(points, axis=0).tolist()
    return page.evaluate(
        """([x, y]) => { const nv = window.metsflowEditor.nv; const box = nv.canvas.getBoundingClientRect();
        const scale = nv.canvas.width / box.width;
        return Array.from(nv.frac2mm(nv.canvasPos2frac([(x - box.left) * scale, (y - box.top) * scale]), 0, true)).slice(0, 3); }""",
        centre,
    )


def _paint_stroke(page: Page, pen: int, dy_px: float = 24.0) -> list:
    """A horizontal 90-pixel stroke ``dy_px`` below the largest lesion's centre."""
    return _paint(page, pen, [(dx, dy_px) for dx in (-45, -22.5, 0, 22.5, 45)])


def _preseg(results: Path) -> nib.Nifti1Image:
    return nib.load(results / "rounds" / "round_1" / "review" / STUDY / PRESEGMENTATION_NAME)


# ---------------------------------------------------------------------- tests


def test_paint_save_confirm_in_the_browser(server, browser, tmp_path):  # noqa: F811
    base_url, config = server
    results = config.results
    store = LabelStore(config.label_store)

    # Admin: dashboard, balanced assignment of the batch from the start page.
    admin = Session(browser, base_url, "adam")
    admin.page.wait_for_selector("#dashboard-section:not([hidden])")
    admin.page.click("#auto-assign")
    wait_for(admin.page, "document.getElementById('assign-result').textContent.includes('tina: 2')")
    assert "tina" in admin.page.inner_text("#queue tbody")
    admin.close()

    # Trainee: the queue lists the study; the editor shows it with the lesion list.
    trainee = Session(browser, base_url, "tina")
    assert STUDY in trainee.page.inner_text("#queue tbody")
    page = trainee.open_study()
    lesions = page.locator("button.lesion")
    assert lesions.count() == 3
    assert "uncertain" in lesions.nth(2).inner_text()  # the 2-voxel one, listed last
    assert "uncertain" not in lesions.nth(0).inner_text()
    assert page.locator("#confirm").is_hidden()  # only a neuroradiologist confirms
    # The overlay uses metsflow's colour table (as the ITK-SNAP/Slicer files do).
    lut = page.evaluate("Array.from(window.metsflowEditor.nv.drawLut.lut.slice(0, 16))")
    for value, rgb in LABEL_COLOURS:
        assert lut[4 * value : 4 * value + 4] == [*rgb, 255], value
        swatch = page.locator(f".pen[data-pen='{value}'] .swatch").evaluate(
            "node => getComputedStyle(node).backgroundColor"
        )
        assert swatch == f"rgb({rgb[0]}, {rgb[1]}, {rgb[2]})"

    stroke_mm = _paint_stroke(page, pen=labels.NECROSIS)
    assert trainee.click("#save", "ok") == "Saved v1 (refined)."
    # The header offers the next study of the trainee's queue.
    page.wait_for_selector("#next-study:not([hidden])")
    assert page.inner_text("#next-study") == f"Next: {FOLLOW_UP} \u2192"
    assert page.get_attribute("#next-study", "href") == f"/study/{FOLLOW_UP}"

    versions = store.versions(STUDY)
    assert [(v["version"], v["stage"]) for v in versions] == [(1, "refined")]
    preseg = _preseg(results)
    saved = nib.load(versions[0]["path"])
    assert saved.shape == preseg.shape
    np.testing.assert_allclose(saved.affine, preseg.affine, atol=1e-4)
    before, after = np.asarray(preseg.dataobj), np.asarray(saved.dataobj)
    changed = np.argwhere(before != after)
    assert len(changed) >= 4, "the mouse stroke changed (almost) nothing"
    assert set(np.unique(after[before != after])) == {labels.NECROSIS}
    # One axial slice of NiiVue = one native slice along the file's I axis (voxel axis 1)...
    assert nib.aff2axcodes(preseg.affine)[1] == "I"
    assert len(np.unique(changed[:, 1])) == 1, "the stroke is not in one native slice"
    # ... and the painted voxels are where NiiVue showed the stroke (a flipped or permuted
    # save would land them tens of mm away).
    world = changed @ preseg.affine[:3, :3].T + preseg.affine[:3, 3]
    offset = np.linalg.norm(world.mean(axis=0) - np.asarray(stroke_mm))
    assert offset < SPACING_MM, f"painted voxels {offset:.1f} mm from the stroke"
    # Independently of NiiVue's coordinates: next to the phantom's largest lesion (the stroke
    # is ~6 mm from its centre; a left-right flip would be ~64 mm away).
    centre = np.asarray(LESIONS[0][0])
    distance = np.linalg.norm(world.mean(axis=0) - centre)
    assert distance < 15.0, f"painted voxels {distance:.1f} mm from the lesion"

    # The editor with the overlay, as the test artifact (and docs/review_editor.png).
    page.click("button.view[data-view=multi]")
    page.click("button.lesion[data-lesion-id='1']")
    _next_frames(page)
    artifact = Path(os.environ.get("METSFLOW_TEST_ARTIFACTS", tmp_path)) / ARTIFACT_NAME
    page.screenshot(path=str(artifact))
    print(f"editor screenshot: {artifact}")
    trainee.close()

    # Neuroradiologist: the study waits for confirmation; confirm it unchanged.
    neurorad = Session(browser, base_url, "nora")
    assert STUDY in neurorad.page.inner_text("#queue tbody")
    page = neurorad.open_study()
    page.once("dialog", lambda dialog: dialog.accept())
    assert neurorad.click("#confirm", "ok") == "Confirmed (v2)."
    assert page.locator("#save").is_hidden()  # confirmed: read-only
    neurorad.close()

    versions = store.versions(STUDY)
    assert [(v["version"], v["stage"]) for v in versions] == [(1, "refined"), (2, "confirmed")]
    np.testing.assert_array_equal(np.asarray(nib.load(versions[1]["path"]).dataobj), after)
    history = {record["version"]: record for record in store.history(STUDY)}
    assert (history[1]["stage"], history[1]["reviewer"]) == ("refined", "tina")
    assert (history[2]["stage"], history[2]["reviewer"]) == ("confirmed", "nora")
    assert history[1]["via"] == history[2]["via"] == "web"

    # Admin: a confirmed label changes only by override, with a reason (a new version).
    admin = Session(browser, base_url, "adam")
    admin.page.wait_for_selector("#study-times tbody tr")
    times = admin.page.inner_text("#study-times tbody")
    assert STUDY in times and "tina" in times and "nora" in times
    page = admin.open_study()
    assert page.locator("#save").is_hidden() and page.locator("#confirm").is_hidden()
    _paint_stroke(page, pen=labels.EDEMA, dy_px=-24)
    assert admin.click("#override", "error") == "An override needs a reason."
    page.fill("#override-reason", "missed satellite lesion")
    assert admin.click("#override", "ok") == "Override saved as v3 (confirmed)."
    admin.close()
    record = store.history(STUDY)[-1]
    assert (record["version"], record["stage"], record["reviewer"]) == (3, "confirmed", "adam")
    assert record["override"] is True and record["reason"] == "missed satellite lesion"


def test_stale_save_reload_and_send_back(server, browser):  # noqa: F811
    base_url, config = server
    store = LabelStore(config.label_store)
    with db.connect(config.db_path) as con, db.transaction(con):
        db.set_assignment(con, STUDY, PATIENT, "round_1", "tina")

    # Straight to the study: login form (one typo), then back to the study.
    trainee = Session(browser, base_url, "tina", start=f"/study/{STUDY}", typo=True)
    neurorad = Session(browser, base_url, "nora", start=f"/study/{STUDY}")
    trainee_page, neurorad_page = trainee.page, neurorad.page

    # FLAIR is shown over the T1c (the drawing stays on the T1c grid) and back.
    trainee_page.click("button.sequence[data-sequence=flair]")
    wait_for(trainee_page, "window.metsflowEditor.state.background === 'flair'")
    assert trainee_page.evaluate("window.metsflowEditor.nv.volumes.length") == 2
    trainee_page.click("button.sequence[data-sequence=t1c]")

    # Both started from the pre-segmentation; the neuroradiologist saves first.
    _paint_stroke(neurorad_page, pen=labels.EDEMA, dy_px=-24)
    assert neurorad.click("#save", "ok") == "Saved v1 (refined)."

    _paint_stroke(trainee_page, pen=labels.NECROSIS)
    text = trainee.click("#save", "conflict")
    assert "nora saved v1" in text and "started from v0" in text
    assert [v["version"] for v in store.versions(STUDY)] == [1]  # nothing written

    # Reload takes the newer version as the new base; the next save goes on top of it.
    assert trainee.click("#conflict-reload", "ok").startswith("Reloaded v1")
    # This time with the filled pen (key F): an outlined square comes back filled.
    trainee_page.keyboard.press("f")
    assert trainee_page.is_checked("#fill")
    square = [(-40, 20), (40, 20), (40, 100), (-40, 100), (-40, 20)]
    inside_mm = _paint(trainee_page, labels.NECROSIS, square)
    assert trainee.click("#save", "ok") == "Saved v2 (refined)."
    v1, v2 = (nib.load(v["path"]) for v in store.versions(STUDY))
    filled = np.asarray(v2.dataobj)
    changed = np.argwhere(np.asarray(v1.dataobj) != filled)
    assert len(np.unique(changed[:, 1])) == 1
    # The square's middle (in-plane from NiiVue, the slice the pen drew on) is painted too.
    middle = nib.affines.apply_affine(np.linalg.inv(v2.affine), inside_mm)
    middle[1] = changed[0, 1]
    assert filled[tuple(np.rint(middle).astype(int))] == labels.NECROSIS, "outline not filled"
    reviewers = [(r["version"], r["reviewer"]) for r in store.history(STUDY)]
    assert reviewers == [(1, "nora"), (2, "tina")]

    # The session ends while editing: the page (and the drawing) stays; after signing in
    # again in another tab, Save works.
    trainee.context.clear_cookies()
    assert "session has ended" in trainee.click("#save", "error")
    other_tab = trainee.context.new_page()
    trainee.login(other_tab)
    other_tab.close()
    assert trainee.click("#save", "ok") == "Saved v3 (refined)."

    # Sent back with a comment: the trainee's queue shows both.
    neurorad_page.fill("#send-back-comment", "edema missing at the posterior border")
    assert neurorad.click("#send-back", "ok") == "Sent back to the trainee."
    trainee_page.goto(f"{base_url}/")
    row = trainee_page.locator(f"#queue tbody tr[data-study-id='{STUDY}']")
    assert "sent back" in row.inner_text()
    assert "edema missing at the posterior border" in row.inner_text()
    trainee.close()
    neurorad.close()
