"""The user documentation (README.md, docs/*.md) against the code: links, commands, files.

The guides live in several pages that link to each other's sections; a renamed heading or a
changed option would otherwise break them silently. Every `metsflow ...` line in a code block or
code span must parse with the real command-line parser, and every relative link must reach an
existing file and heading.
"""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import REPO

from metsflow.cli import build_parser

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^ *```[a-z]*\n(.*?)^ *```", re.MULTILINE | re.DOTALL)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page) -> set[str]:
    text = _FENCE.sub("", page.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def _metsflow_commands(text: str) -> list[str]:
    """`metsflow ...` command lines of code blocks and code spans with options."""
    lines = []
    for block in _FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()
    # In prose, a span with options is a command; `metsflow al import` alone names one.
    spans = re.findall(r"`(metsflow [^`]+)`", _FENCE.sub("", text).replace("\n", " "))
    lines += [span for span in spans if " --" in span]
    commands = []
    for line in lines:
        line = line.strip().lstrip("$ ").split(" # ")[0].split("|")[-1].strip()
        # Templates: optional [--flag X] parts are dropped, `--final ...` is not a command.
        line = re.sub(r"\s\[[^\]]*\]", "", line)
        if line.startswith("metsflow ") and not re.search(r"\.\.\.|<", line):
            commands.append(line)
    return commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_reach_a_file_and_heading(page):
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


def test_every_documented_metsflow_command_parses():
    parser = build_parser()
    commands = [(p.name, c) for p in PAGES for c in _metsflow_commands(p.read_text())]
    assert len(commands) >= 20, commands  # the extraction found the guides' commands
    refused = []
    for page, command in commands:
        try:
            parser.parse_args(shlex.split(command)[1:])
        except SystemExit:
            refused.append(f"{page}: {command}")
    assert not refused, refused


def test_the_readme_stays_short_and_links_every_guide():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 120
    for guide in ("running", "reviewing", "interop", "cost", "measured", "architecture"):
        assert f"(docs/{guide}.md)" in text, guide
