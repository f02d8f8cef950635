"""The repository documents itself: a README a newcomer reads in minutes (under 8,000
characters, with the set-up commands CI runs), links in README.md and docs/ that lead
somewhere in the repository, and no file that points outside it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools.bench import realtime as bench_realtime
from tools.docs.markers import read_between

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# written apart so that this file does not match what it looks for
OUTSIDE = re.compile(r"\.\./" + "shared|DESIGN" + r"\.md|PAPER" + r"\.md")
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis", "build", "dist"}


def test_readme_is_short() -> None:
    assert len(README.read_text(encoding="utf-8")) < 8000


def test_readme_has_the_test_command_ci_runs() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.startswith("python3 -m venv .venv")]
    assert len(ci) == 1
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert ci[0] in [b.strip() for b in blocks]


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_lead_somewhere(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists() or ROOT not in dest.parents:
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_code_a_page_names_exists(page: Path) -> None:
    """Every `testbed/...py`-style path and every `python -m tools.X` / `runners.X` command a
    page names is a file of the repository (a move of the code updates its docs)."""
    text = page.read_text(encoding="utf-8")
    missing = [p for p in re.findall(r"`((?:testbed|tools|runners|tests)/[\w/]+\.(?:py|js|html|css))`", text)
               if not (ROOT / p).exists()]
    for mod in re.findall(r"python -m ((?:tools|runners)(?:\.\w+)+)", text):
        path = ROOT.joinpath(*mod.split("."))
        if not (path.with_suffix(".py").exists() or (path / "__init__.py").exists()):
            missing.append(mod)
    assert not missing, f"{page.name}: {sorted(set(missing))}"


def repository_files() -> list[Path]:
    out = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if rel.parts[0] == "results" and rel.parts[:2] != ("results", "paper"):
            continue  # run outputs (git-ignored), not the repository
        if path.is_file() and path.suffix not in (".png", ".gguf", ".pyc"):
            out.append(path)
    return out


def test_nothing_refers_outside_the_repository() -> None:
    found = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_real_clock_table_lives_in_the_fidelity_page() -> None:
    assert bench_realtime.DOC == ROOT / "docs" / "fidelity.md"
    table = read_between(bench_realtime.DOC.read_text(), bench_realtime.SECTION)
    assert table is not None and "| scenario | agents |" in table
    assert read_between(README.read_text(), bench_realtime.SECTION) is None
