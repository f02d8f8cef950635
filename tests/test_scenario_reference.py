"""The scenario reference (docs/scenarios.md) cannot drift from the loader: every key the
loader accepts is documented and every documented key is accepted (both read the loader's
one table, `testbed.scenario.KEYS`), the values of `CHOICES` likewise, every section of the
table is what the loader checks, and every YAML example of the reference loads."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed import scenario
from testbed.scenario import CHOICES, KEYS, ScenarioError, parse
from tools.docs.scenario_reference import check, documented, main, problems

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
REFERENCE = ROOT / "docs" / "scenarios.md"


def doc() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    return documented(p.read_text() for p in DOCS)


def test_the_reference_matches_the_loader() -> None:
    assert check(DOCS) == []
    assert main([]) == 0


def test_a_key_added_to_the_loader_without_documentation_is_reported() -> None:
    keys = {**KEYS, "controller": (*KEYS["controller"], "new_knob"), "background": ("level",)}
    found = problems(keys, CHOICES, *doc())
    assert "controller.new_knob: key accepted by the loader but not documented" in found
    assert "background.level: key accepted by the loader but not documented" in found
    assert len(found) == 2, found


def test_a_documented_key_the_loader_refuses_is_reported() -> None:
    doc_keys, doc_values = doc()
    doc_keys = {**doc_keys, "devices[]": doc_keys["devices[]"] | {"battery_wh"}}
    assert problems(KEYS, CHOICES, doc_keys, doc_values) == [
        "devices[].battery_wh: key documented but not accepted by the loader"]


def test_a_value_added_without_documentation_is_reported() -> None:
    choices = {**CHOICES, "model.preset": (*CHOICES["model.preset"], "gpt-huge")}
    assert problems(KEYS, choices, *doc()) == [
        "model.preset.gpt-huge: value accepted by the loader but not documented"]


def test_a_marked_table_is_read_from_its_first_column() -> None:
    text = ("<!-- keys: top, network.links[] -->\n\n| key | meaning |\n|---|---|\n| `alpha` | a |\n"
            "| beta | b |\n\nprose\n<!-- values: controller.telemetry -->\n| value |\n|---|\n| x |\n")
    keys, values = documented([text])
    assert keys == {"": {"alpha", "beta"}, "network.links[]": {"alpha", "beta"}}
    assert values == {"controller.telemetry": {"x"}}


# ---------------------------------------------------------------------------- the examples


def yaml_blocks() -> list[Any]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", REFERENCE.read_text(), re.S)]


def full_example() -> dict[str, Any]:
    """The reference's complete example with every event example of the page as its events."""
    blocks = yaml_blocks()
    (base,) = [b for b in blocks if "version" in b]
    d = copy.deepcopy(base)
    d["events"] = [e for b in blocks if "version" not in b for e in b["events"]]
    return d


def test_every_example_of_the_reference_loads() -> None:
    blocks = yaml_blocks()
    (base,) = [b for b in blocks if "version" in b]
    parse(base, "docs/scenarios.md")
    for b in blocks:
        if "version" not in b:
            assert set(b) == {"events"}, b
            parse({**base, "events": b["events"]}, "docs/scenarios.md")
    actions = {e["action"] for b in blocks if "version" not in b for e in b["events"]}
    assert actions == set(CHOICES["events[].action"])  # an example per event kind
    parse(full_example(), "docs/scenarios.md")


def locate(d: dict[str, Any], section: str) -> dict[str, Any]:
    """The mapping of `d` that section `section` of KEYS describes (the first item of a list;
    for an action, the first event with that action)."""
    node: Any = d
    items: list[Any] | None = None
    for part in section.split(".") if section else []:
        if items is not None and any(isinstance(e, dict) and e.get("action") == part for e in items):
            node = next(e for e in items if e.get("action") == part)
            items = None
            continue
        name = part.removesuffix("[]")
        if not isinstance(node, dict) or name not in node:
            raise LookupError(f"the reference's examples have no {section!r} section: add one to docs/scenarios.md")
        node = node[name]
        items = node if part.endswith("[]") else None
        if items is not None:
            node = items[0]
    return node


@pytest.mark.parametrize("section", sorted(KEYS))
def test_every_section_of_the_table_is_what_the_loader_checks(section: str) -> None:
    d = full_example()
    locate(d, section)["no_such_key"] = 1
    with pytest.raises(ScenarioError, match=r"no_such_key: unknown key 'no_such_key' \(allowed: "):
        parse(d, "<test>")


def test_a_key_added_to_the_table_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    d = full_example()
    d["controller"]["new_knob"] = 1
    with pytest.raises(ScenarioError, match="controller.new_knob: unknown key"):
        parse(d, "<test>")
    monkeypatch.setitem(scenario.KEYS, "controller", (*KEYS["controller"], "new_knob"))
    parse(d, "<test>")  # the loader's check reads the table
