"""The limits that the standalone service's OpenAPI document and web page show are the ones runtime/validation.py
enforces: every minimum and maximum, the size rule, and every range written as prose. A changed constant must make
the documents fail here, which the second test proves constant by constant."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from runtime import validation

REPO = Path(__file__).resolve().parents[1]
OPENAPI = REPO / "backend" / "standalone" / "openapi.json"
PAGE = REPO / "backend" / "standalone" / "page"
NAMES = ("MIN_SIDE", "MAX_SIDE", "SIDE_STEP", "MAX_IMAGES", "MAX_STEPS", "MAX_GUIDANCE", "MAX_SEED")
LIMITS: dict[str, float] = {name: getattr(validation, name) for name in NAMES}
#: Prose such as "1-100", "0–30" or "256 to 1024"; regular-expression patterns are not prose and are not read.
PROSE_RANGE = re.compile(r"(?<![\w.-])(\d+)\s*(?:-|–|to)\s*(\d+)(?![\w.-])")
SIZE_RULE = re.compile(r"multiples of (\d+) from (\d+) to (\d+)")


def _fields(limits: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Each numeric task input and the range validation allows it."""
    return {"numberOfImages": (1, limits["MAX_IMAGES"]), "steps": (1, limits["MAX_STEPS"]),
            "guidance": (0, limits["MAX_GUIDANCE"]), "seed": (0, limits["MAX_SEED"])}


def _prose(where: str, text: str, limits: dict[str, float]) -> list[str]:
    allowed = {*_fields(limits).values(), (limits["MIN_SIDE"], limits["MAX_SIDE"])}
    return [f"{where}: {m.group(0)!r} is no range that validation allows ({sorted(allowed)})"
            for m in PROSE_RANGE.finditer(text) if (float(m.group(1)), float(m.group(2))) not in allowed]


def _side_rule(where: str, text: str, limits: dict[str, float]) -> list[str]:
    want = (limits["SIDE_STEP"], limits["MIN_SIDE"], limits["MAX_SIDE"])
    m = SIZE_RULE.search(text)
    if m is None or tuple(float(g) for g in m.groups()) != want:
        return [f"{where}: size rule {text!r}, validation allows multiples of {want[0]} from {want[1]} to {want[2]}"]
    return []


def _strings(node: Any, path: str = "", key: str = "") -> list[tuple[str, str, str]]:
    """(path, key, text) of every string in the document; key is the name of the member that holds it."""
    if isinstance(node, str):
        return [(path, key, node)]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(v, f"{path}/{k}", k)]
    if isinstance(node, list):
        return [s for i, v in enumerate(node) for s in _strings(v, f"{path}/{i}", key)]
    return []


def _openapi_mismatches(limits: dict[str, float]) -> list[str]:
    doc = json.loads(OPENAPI.read_text(encoding="utf-8"))
    fields, wrong = _fields(limits), []
    request = doc["components"]["schemas"]["ScheduleRequest"]["properties"]
    assert set(fields) <= set(request), sorted(request)
    for name, prop in request.items():
        if prop.get("type") in ("integer", "number"):
            shown = (prop.get("minimum"), prop.get("maximum"))
            if shown != fields.get(name):
                wrong.append(f"openapi.json {name}: minimum/maximum {shown}, validation allows {fields.get(name)}")
            if "default" in prop and not shown[0] <= prop["default"] <= shown[1]:
                wrong.append(f"openapi.json {name}: default {prop['default']} outside {shown}")
    wrong += _side_rule("openapi.json size", request["size"]["description"], limits)
    for path, key, text in _strings(doc):
        if key != "pattern":
            wrong += _prose(f"openapi.json {path}", text, limits)
    return wrong


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, dict[str, str | None]] = {}
        self.sizes: list[str] = []
        self.text: list[str] = []
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("type") == "number":
            self.inputs[str(found.get("name"))] = found
        if tag == "select":
            self._select = found.get("name")
        self.text += [v for k, v in attrs if k in ("placeholder", "title", "aria-label") and v]

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None

    def handle_data(self, data: str) -> None:
        if self._select == "size" and data.strip():
            self.sizes.append(data.strip())
        self.text.append(data)


def _page_mismatches(limits: dict[str, float]) -> list[str]:
    page = _Page()
    page.feed((PAGE / "index.html").read_text(encoding="utf-8"))
    fields, wrong = _fields(limits), []
    assert set(fields) <= set(page.inputs), sorted(page.inputs)
    for name, attrs in page.inputs.items():
        low, high = fields.get(name, (None, None))
        shown = (attrs.get("min"), attrs.get("max"))
        # A JavaScript number cannot hold the largest seed exactly, so the seed field may leave its maximum out.
        ok_high = (shown[1] is None and name == "seed") or (shown[1] is not None and float(shown[1]) == high)
        if low is None or shown[0] is None or float(shown[0]) != low or not ok_high:
            wrong.append(f"index.html {name}: min/max {shown}, validation allows {(low, high)}")
    sides = []
    for size in (s for s in page.sizes if s != "model default"):
        sides += [int(side) for side in size.split("x")]
    step = limits["SIDE_STEP"]
    if any(side % step for side in sides) or (min(sides), max(sides)) != (limits["MIN_SIDE"], limits["MAX_SIDE"]):
        wrong.append(f"index.html sizes {page.sizes}: validation allows multiples of {step} from "
                     f"{limits['MIN_SIDE']} to {limits['MAX_SIDE']}, and the list should reach both ends")
    for number, text in enumerate(page.text):
        wrong += _prose(f"index.html text {number}", text, limits)
    script = (PAGE / "app.js").read_text(encoding="utf-8")
    for literal in re.findall(r"""(["'`])((?:(?!\1).)*)\1""", script):
        wrong += _prose("app.js", literal[1], limits)
    return wrong


def test_the_documents_show_the_limits_validation_enforces() -> None:
    wrong = _openapi_mismatches(LIMITS) + _page_mismatches(LIMITS)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("name", NAMES)
def test_a_changed_limit_is_caught(name: str) -> None:
    changed = {**LIMITS, name: LIMITS[name] + 1}
    assert _openapi_mismatches(changed), f"openapi.json does not notice {name} changing"
    if name != "MAX_SEED":  # the page shows no largest seed
        assert _page_mismatches(changed), f"the page does not notice {name} changing"


def test_prose_ranges_are_read() -> None:
    assert _prose("x", "steps 1-100, guidance 0–30, sizes 256 to 1024, 12 images", LIMITS) == []
    [wrong] = _prose("x", "steps 1-50", LIMITS)
    assert wrong.startswith("x: '1-50' is no range that validation allows"), wrong
    assert _prose("x", "version 1.2-3, 2026-12-06", LIMITS) == []


def test_the_program_texts_write_no_range_by_hand() -> None:
    # The CLI's help, the provider's input descriptions and the admin form's field descriptions are f-strings of
    # the constants; a range written out as a literal would stay behind when a constant changes.
    literal = re.compile(r"""(?<![{\w.-])(?:1\s*[-–]\s*(?:12|100)|0\s*[-–]\s*30)(?![\w.}-])""")
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}"
             for path in sorted((REPO / "backend").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []
