"""The figures README.md and docs/ quote are current: every generated section is recomputed
(virtual-clock runs of the shipped scenarios, the cost model, the paper report) and compared
with the files; and the machinery that writes and compares sections does what it says."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testbed.model import smollm2
from tools.docs import figures as docfigures
from tools.docs.figures import SECTIONS, Runs, stale
from tools.docs.markers import MarkerError, read_between, replace_between, write_between

ROOT = Path(__file__).resolve().parents[1]


def test_sections_are_written_between_their_markers(tmp_path: Path) -> None:
    text = "intro\n<!-- figures:x:begin -->\nold\n<!-- figures:x:end -->\nouttro\n"
    new = replace_between(text, "figures:x", "new 1\nnew 2")
    assert new == "intro\n<!-- figures:x:begin -->\nnew 1\nnew 2\n<!-- figures:x:end -->\nouttro\n"
    assert read_between(new, "figures:x") == "new 1\nnew 2"
    assert read_between(new, "figures:y") is None
    f = tmp_path / "doc.md"
    f.write_text("no section here\n")
    with pytest.raises(MarkerError, match="doc.md: no <!-- figures:x:begin --> ... <!-- figures:x:end --> section"):
        write_between(f, "figures:x", "new")
    assert f.read_text() == "no section here\n"  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["doc.md"]


def test_a_stale_figure_is_reported(tmp_path: Path) -> None:
    """By construction: a copy of the scenario reference whose presets table lost a digit."""
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "scenarios.md", tmp_path / "docs" / "scenarios.md")
    text = docfigures.presets(Runs(tmp_path))
    assert stale("presets", text, root=tmp_path) is None
    f = tmp_path / "docs" / "scenarios.md"
    f.write_text(f.read_text().replace("| 12 | 0.38 |", "| 12 | 0.39 |"))
    why = stale("presets", text, root=tmp_path)
    assert why is not None and why.startswith("docs/scenarios.md: figures:presets is stale from its line")
    assert "0.39" in why


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("docruns"))


@pytest.mark.parametrize("name", ["main_job", "plugin", "presets", "paper", "device_presets", "link_presets",
                                  "validation", "edge_presets", "roofline_sweep", "kernel_burst", "migration"])
def test_the_quoted_figures_are_current(name: str, runs: Runs) -> None:
    """Regenerate with `python -m tools.docs.figures` when this fails (after checking that the
    change in the figures is meant)."""
    assert stale(name, SECTIONS[name].make(runs)) is None


@pytest.mark.skipif(not smollm2.available(), reason=f"needs the SmolLM2 weights: {smollm2.PIP_HINT}")
def test_the_smollm2_figures_are_current(runs: Runs) -> None:
    assert stale("smollm2", SECTIONS["smollm2"].make(runs)) is None
    assert stale("migration_smollm2", SECTIONS["migration_smollm2"].make(runs)) is None


def test_check_mode_and_bad_names(capsys: pytest.CaptureFixture[str]) -> None:
    assert docfigures.main(["presets", "--check"]) == 0
    assert capsys.readouterr().out.strip() == "presets: current"
    assert docfigures.main(["nope"]) == 2
    assert "unknown section 'nope'" in capsys.readouterr().err
