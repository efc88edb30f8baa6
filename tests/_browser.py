"""The review platform's browser harness, shared by the browser tests: Debian's ``chromium``
driven by Playwright (headless, WebGL2 in software through SwiftShader), a signed-in ``Session``
that fails on any JavaScript error or Content-Security-Policy violation, and ``wait_for`` (a
CSP-safe poll). Nothing here skips: no Chromium or no NiiVue bundle is a failure that says what
to install."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
from playwright.sync_api import Page, sync_playwright

from metsflow.review_server.routes import NIIVUE_DIST

STUDY = "S01"
PASSWORD = "correct horse battery"
USERS = {"tina": "trainee", "nora": "neuroradiologist", "adam": "admin"}
# Voxel axes P, I, L (a sagittal acquisition), rotated: far from NiiVue's RAS.
AXES = np.array([[0.0, 0.0, -1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
SHAPE = (60, 52, 52)
SPACING_MM = 3.0
# Chromium has no GPU here: WebGL2 through ANGLE on SwiftShader (software).
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
TIMEOUT_MS = 30_000
# Small enough that SwiftShader redraws quickly, large enough for the editor's three columns.
VIEWPORT = {"width": 1200, "height": 720}


@pytest.fixture(scope="module")
def browser():
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail(
            "Chromium not found on PATH: the browser tests need Debian's `chromium` package "
            "(./test.sh installs it: apt-get install -y chromium)",
            pytrace=False,
        )
    if not (NIIVUE_DIST / "index.js").is_file():
        pytest.fail(
            f"NiiVue bundle missing ({NIIVUE_DIST}): run ./setup.sh "
            "(npm ci --prefix metsflow/review_server/web)",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


def wait_for(page: Page, expression: str, arg=None, timeout_ms: float = TIMEOUT_MS):
    """Poll ``expression`` (or a function of ``arg``) until it is truthy. Not
    ``page.wait_for_function``: that one evaluates its predicate from a string inside the page,
    which the server's Content-Security-Policy (no 'unsafe-eval') refuses; ``page.evaluate``
    goes through the DevTools protocol, outside the page's CSP."""
    deadline = time.monotonic() + timeout_ms / 1000
    while not page.evaluate(expression, arg):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{expression!r} still false after {timeout_ms / 1000:.0f} s")
        page.wait_for_timeout(50)


class Session:
    """One signed-in browser context with the page's JavaScript errors collected."""

    def __init__(self, browser, base_url: str, username: str, start: str = "/", typo=False):
        self.context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
        self.context.set_default_timeout(TIMEOUT_MS)
        # Every Content-Security-Policy violation is a console error, so close() fails on it.
        self.context.add_init_script(
            "document.addEventListener('securitypolicyviolation', e => console.error("
            "`CSP violation: ${e.violatedDirective} blocked ${e.blockedURI}`))"
        )
        self.page: Page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.page.on("console", self._console)
        self.base_url = base_url
        self.username = username
        self.login(self.page, start, typo)

    def login(self, page: Page, start: str = "/", typo: bool = False):
        """Open ``start`` anonymously: the server sends the browser to the login form, which
        sends it back after signing in (with ``typo``, after one wrong password first)."""
        response = page.goto(f"{self.base_url}{start}")
        page.wait_for_url(lambda url: "/login?next=" in url)
        assert "script-src 'self'" in response.headers["content-security-policy"]
        page.fill("#username", self.username)
        if typo:
            page.fill("#password", "not the password")
            page.click("#login-button")
            page.wait_for_selector("#login-error:not([hidden])")
            assert page.inner_text("#login-error") == "wrong user name or password"
        page.fill("#password", PASSWORD)
        page.click("#login-button")
        page.wait_for_url(f"{self.base_url}{start}")
        if start == "/":
            page.wait_for_selector("#queue tbody tr")
        else:
            self.wait_ready()

    def _console(self, msg):
        # HTTP errors (a 409 on a stale save...) are asserted through what the page shows.
        if msg.type == "error" and not msg.text.startswith("Failed to load resource"):
            self.errors.append(msg.text)

    def open_study(self, study_id: str = STUDY) -> Page:
        self.page.goto(f"{self.base_url}/study/{study_id}")
        self.wait_ready()
        return self.page

    def wait_ready(self):
        wait_for(self.page, "document.body.dataset.ready")
        assert self.page.evaluate("document.body.dataset.ready") == "1", self.message()

    def message(self) -> str:
        return self.page.inner_text("#message")

    def click(self, selector: str, kind: str) -> str:
        """Click ``selector`` and return the next final (not "Saving...") message, which must
        be of ``kind`` (ok, error, conflict)."""
        seq = self.page.evaluate("Number(document.getElementById('message').dataset.seq ?? 0)")
        self.page.click(selector)
        wait_for(
            self.page,
            """seq => { const box = document.getElementById('message');
            return Number(box.dataset.seq ?? 0) > seq && box.dataset.kind !== 'info'; }""",
            arg=seq,
        )
        assert self.page.evaluate("document.getElementById('message').dataset.kind") == kind, (
            self.message()
        )
        return self.message()

    def close(self):
        self.context.close()
        assert not self.errors, f"JavaScript errors in the page: {self.errors}"


def _next_frames(page: Page):
    # NiiVue lays the tiles out while drawing: let it draw before asking for screen positions.
    page.evaluate(
        "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r())))"
    )
