"""The `ipl eval` report as people read it: one metrics table first, arrows, notes for missing values, terminal tables."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from ipltool import report

NO_REFERENCE = "no --reference folder of real target-domain images"
NO_LPIPS = "LPIPS diversity is not implemented (needs VGG weights)"


def _result(name: str, label: str, fid: float | None, domain: str | None = "disney") -> dict:
    metrics = {"is_mean": 2.5, "is_std": 0.12, "fid": fid, "fid_src_tgt": 3.0, "clip_score": 0.31, "div_lpips": None}
    reasons = {"div_lpips": NO_LPIPS} | ({"fid": NO_REFERENCE} if fid is None else {})
    return {
        "name": name, "label": label, "domain": domain, "kind": "run", "path": f"/runs/{name}",
        "samples": f"samples/{name}.png", "metrics": metrics, "reasons": reasons, "meta": {},
    }


@pytest.fixture
def results() -> list[dict]:
    """Two IPL runs of disney (same domain and method), a NADA run and an anime IPL run."""
    return [
        _result("disney-20261121-101500", "ipl", None),
        _result("disney-20261122-090000", "ipl", None),
        _result("disney-20261121-120000", "nada", 41.5),
        _result("anime-20261121-130000", "ipl", 38.0, domain="anime"),
    ]


def test_runs_get_short_unique_labels(results):
    assert report.run_labels(results) == ["disney·ipl·1", "disney·ipl·2", "disney·nada", "anime·ipl"]
    assert report.method_labels(results) == ["ipl·1", "ipl·2", "nada", "ipl"]
    folder = _result("pictures", "pictures", None, domain=None)
    assert report.run_labels([folder]) == ["pictures"]


def test_missing_values_are_numbered_once_per_reason(results):
    notes = report.missing_notes(results)
    assert notes.reasons == [NO_REFERENCE, NO_LPIPS]
    assert report.cell(results, 0, "fid", notes) == "–¹" and report.cell(results, 2, "fid", notes) == "41.5"
    assert report.cell(results, 3, "div_lpips", notes) == "–²"
    assert report.cell(results, 0, "is_mean", notes) == "2.5 ± 0.12"


def test_markdown_starts_with_one_metrics_table_with_arrows_and_notes(results):
    text = report.markdown(results, {"weights": "real", "seed": 0, "truncation": 0.7})
    lines = text.splitlines()
    tables = [i for i, line in enumerate(lines) if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|"))]
    assert len(tables) == 1  # one table, and nothing but the title and a settings line before it
    start = tables[0]
    assert next(line for line in lines[:start] if line.strip()) == "# ipl eval report" and start <= 4
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    assert header == ["run", "is_mean ↑", "fid ↓", "fid_src_tgt", "clip_score ↑", "div_lpips ↑"]
    rows = [line for line in lines[start + 2 :] if line.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows] == ["disney·ipl·1", "disney·ipl·2", "disney·nada", "anime·ipl"]
    assert "| –¹ |" in rows[0] and "| 41.5 |" in rows[2] and rows[3].endswith("| –² |")
    assert f"¹ {NO_REFERENCE}" in text and f"² {NO_LPIPS}" in text
    assert text.index(NO_REFERENCE) < text.index("## Samples") < text.index("![samples of disney·ipl·1](samples/disney-20261121-101500.png)")


class _Page(HTMLParser):
    """The tags of the page that the checks need: tables, missing cells, notes and images."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_page_has_one_table_first_with_tooltips_and_notes(results):
    page = report.html_page(results, {"weights": "real", "seed": 0, "truncation": 0.7})
    parser = _Page()
    parser.feed(page)
    tags = [tag for tag, _ in parser.tags]
    assert tags.count("table") == 1 and tags.index("table") < tags.index("img")
    missing = [attrs for tag, attrs in parser.tags if tag == "td" and attrs.get("class") == "missing"]
    assert len(missing) == 2 + 4 and {m["title"] for m in missing} == {NO_REFERENCE, NO_LPIPS}
    assert re.search(r"<li id='note-1'>no --reference folder", page) and "<th title='lower is better'>fid ↓</th>" in page
    assert [a["src"] for tag, a in parser.tags if tag == "img"] == [f"samples/{r['name']}.png" for r in results]


def _terminal(monkeypatch, capsys, results, compare: bool) -> str:
    from ipltool import console
    from ipltool.commands.eval import _print

    monkeypatch.setenv("COLUMNS", "80")
    console.reset()  # rich reads COLUMNS when a console is made
    _print(results, compare)
    return capsys.readouterr().out


def test_terminal_table_tells_runs_apart_within_80_columns(results, monkeypatch, capsys):
    out = _terminal(monkeypatch, capsys, results, compare=False)
    table_lines = [line for line in out.splitlines() if not line.startswith(("¹", "²"))]
    assert max(len(line) for line in table_lines) <= 80
    for label in report.run_labels(results):
        assert label in out
    assert "fid ↓" in out and "is_mean ↑" in out and "–¹" in out
    assert f"¹ {NO_REFERENCE}" in out and f"² {NO_LPIPS}" in out


def test_terminal_table_splits_many_runs_to_fit(monkeypatch, capsys):
    many = [_result(f"d{i}-20261121-10000{i}", "ipl", 40.0 + i, domain=f"domain{i}") for i in range(9)]
    out = _terminal(monkeypatch, capsys, many, compare=False)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "ipl eval (1/3)" in out and "ipl eval (3/3)" in out and all(f"domain{i}·ipl" in out for i in range(9))


def test_compare_keeps_the_paper_layout_with_arrows(results, monkeypatch, capsys):
    out = _terminal(monkeypatch, capsys, results, compare=True)
    assert max(len(line) for line in out.splitlines() if not line.startswith(("¹", "²"))) <= 80
    header = next(line for line in out.splitlines() if "metric" in line)
    assert header.split() == ["metric", "domain", "ipl·1", "ipl·2", "nada"]
    # anime's only IPL run sits in the first IPL column: a column means one thing in every domain
    assert re.search(r"fid ↓\s+disney\s+–¹\s+–¹\s+41\.5 *\n\s+anime\s+38 *\n", out)
