"""The `ipl eval` report: metrics.json, metrics.csv, metrics.md and index.html with sample grids.

metrics.md and index.html open with one table: a row per input under a short unique label
(`disney·ipl`; `disney·ipl·1`, `disney·ipl·2` for two runs of one pair), a column per
metric with ↑/↓, and a missing value as "–" with a numbered note that gives its reason.
The sample grids follow. `tables` gives the paper's layout instead (per metric, a row per
domain and a column per method), for `ipl eval --compare`. Every file is written
atomically; image paths in the HTML page are relative, so the folder can be moved or
zipped and still opens in a browser.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ipltool.atomic import atomic_write_bytes, atomic_write_text

#: Whether a larger value is better, for the tables' arrows (None: no order).
HIGHER_IS_BETTER = {
    "is_mean": True, "fid": False, "fid_src_tgt": None, "kid_mean": False, "sifid_mean": False,
    "scs": True, "id_sim": True, "clip_score": True, "clip_dir": True, "div_clip": True, "div_lpips": True,
}
#: Keys that are spreads of another key, shown as ± next to it rather than as tables.
SPREADS = {"is_std": "is_mean", "kid_std": "kid_mean", "sifid_std": "sifid_mean"}
MISSING = "–"
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def column_names(results: list[dict]) -> list[str]:
    """Set each result's `column` (kept in metrics.json): the method, or `method (run name)` when a domain has two of one method."""
    seen: dict[tuple[str, str], int] = {}
    for r in results:
        key = (r["domain"] or "-", r["label"])
        seen[key] = seen.get(key, 0) + 1
    for r in results:
        r["column"] = r["label"] if seen[(r["domain"] or "-", r["label"])] == 1 else f"{r['label']} ({r['name']})"
    return list(dict.fromkeys(r["column"] for r in results))


def metric_keys(results: list[dict]) -> list[str]:
    """Every metric key present in the results, in report order, spreads left out."""
    keys: list[str] = []
    for r in results:
        for key in r["metrics"]:
            if key not in keys and key not in SPREADS:
                keys.append(key)
    return keys


def method_labels(results: list[dict], columns: bool = False) -> list[str]:
    """Per result, its method: `ipl`, or `ipl·1`, `ipl·2`, … for the runs of a domain that has two of it.

    With `columns` (the paper layout's method columns), once any domain has two runs of a
    method, that method is numbered in every domain, so each column means one thing.
    """
    counts = Counter((r["domain"], r["label"]) for r in results)
    repeated = {method for (_, method), count in counts.items() if count > 1}
    seen: Counter = Counter()
    labels = []
    for r in results:
        pair = (r["domain"], r["label"])
        seen[pair] += 1
        numbered = counts[pair] > 1 or (columns and r["label"] in repeated)
        labels.append(f"{r['label']}·{seen[pair]}" if numbered else r["label"])
    return labels


def run_labels(results: list[dict]) -> list[str]:
    """Per result, a short unique label: `domain·method` (`disney·ipl`, `disney·ipl·2`), the method alone without a domain."""
    return [f"{r['domain']}·{method}" if r["domain"] else method for r, method in zip(results, method_labels(results))]


def heading(key: str) -> str:
    """A metric's column heading: the key and ↑ (higher is better) or ↓ (lower is better)."""
    better = HIGHER_IS_BETTER.get(key.split("[")[0])
    return key + (" ↑" if better else (" ↓" if better is False else ""))


def superscript(number: int) -> str:
    """`number` in superscript digits (the note marks of plain-text tables)."""
    return str(number).translate(_SUPERSCRIPTS)


@dataclass
class Notes:
    """The reasons for missing values, numbered from 1: `reasons[n - 1]` is note n."""

    reasons: list[str]
    marks: dict[tuple[int, str], int]  # (result index, metric key) -> note number


def missing_notes(results: list[dict]) -> Notes:
    """One note per distinct reason of a missing table value, numbered in reading order (row by row)."""
    reasons: list[str] = []
    marks: dict[tuple[int, str], int] = {}
    for i, r in enumerate(results):
        for key in metric_keys(results):
            why = r["reasons"].get(key)
            if r["metrics"].get(key) is None and why:
                if why not in reasons:
                    reasons.append(why)
                marks[(i, key)] = reasons.index(why) + 1
    return Notes(reasons, marks)


def format_value(result: dict, key: str) -> str:
    """`value` or `value ± spread` with 4 significant digits; `MISSING` (–) for a missing value."""
    value = result["metrics"].get(key)
    if value is None:
        return MISSING
    text = f"{value:.4g}"
    spread = next((s for s, base in SPREADS.items() if base == key), None)
    if spread and result["metrics"].get(spread) is not None:
        text += f" ± {result['metrics'][spread]:.2g}"
    return text


def cell(results: list[dict], index: int, key: str, notes: Notes) -> str:
    """Plain-text cell of metric `key` of result `index`: `format_value`, and the note's number in superscript when missing."""
    mark = notes.marks.get((index, key))
    return format_value(results[index], key) + (superscript(mark) if mark else "")


def tables(results: list[dict]) -> dict[str, tuple[list[str], list[str], dict[tuple[str, str], str]]]:
    """The paper's layout, per metric key: (row domains, method columns, {(domain, column): text}), notes as in `missing_notes`."""
    notes = missing_notes(results)
    methods = method_labels(results, columns=True)
    columns = list(dict.fromkeys(methods))
    rows = list(dict.fromkeys(r["domain"] or "-" for r in results))
    out = {}
    for key in metric_keys(results):
        cells = {(r["domain"] or "-", methods[i]): cell(results, i, key, notes) for i, r in enumerate(results) if key in r["metrics"]}
        out[key] = (rows, columns, cells)
    return out


def _settings_line(settings: dict) -> str:
    weights, seed, psi = settings.get("weights"), settings.get("seed"), settings.get("truncation")
    return f"{datetime.now().strftime('%Y-%m-%d %H:%M')} · weights: {weights} · seed {seed} · ψ {psi}"


def markdown(results: list[dict], settings: dict) -> str:
    """The report as markdown: the metrics table (a row per input), its notes, the inputs, then the sample grids."""
    labels, keys, notes = run_labels(results), metric_keys(results), missing_notes(results)

    def md(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["# ipl eval report", "", _settings_line(settings), ""]
    lines += ["| run | " + " | ".join(heading(k) for k in keys) + " |", "|:---|" + "---:|" * len(keys)]
    for i, label in enumerate(labels):
        lines.append(f"| {md(label)} | " + " | ".join(cell(results, i, k, notes) for k in keys) + " |")
    lines.append("")
    lines += [f"{superscript(n)} {why}  " for n, why in enumerate(notes.reasons, 1)]  # two spaces: a line break
    lines += ["", "↑ higher is better, ↓ lower is better, – no value (the note says why).", "", "## Inputs", ""]
    lines += [f"- **{label}**: {r['name']} ({r['kind']}) `{r['path']}`" for label, r in zip(labels, results)]
    lines += ["", "## Samples", ""]
    for label, r in zip(labels, results):
        if r.get("samples"):
            lines += [f"### {label}", "", f"![samples of {label}]({r['samples']})", ""]
    return "\n".join(lines)


def csv_text(results: list[dict]) -> str:
    """One row per input: name, domain, method, kind, path, then every metric key."""
    keys = list(dict.fromkeys(k for r in results for k in r["metrics"]))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["name", "domain", "method", "kind", "path", *keys])
    for r in results:
        writer.writerow([r["name"], r["domain"] or "", r["label"], r["kind"], r["path"], *("" if r["metrics"].get(k) is None else r["metrics"][k] for k in keys)])
    return buffer.getvalue()


_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:1360px;color:#222}"
    ".scroll{overflow-x:auto}table{border-collapse:collapse;margin:0 0 .6em;font-size:.92em;font-variant-numeric:tabular-nums}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}thead th{background:#f0f2f5}"
    # line-height 0: a note mark must not make its row taller than the others
    "th:first-child{text-align:left}td.missing{color:#666}sup{line-height:0}sup a{text-decoration:none}"
    ".notes{margin:.2em 0 .6em;padding-left:1.6em;color:#444}.dim{color:#777}"
    "figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #ddd}figcaption{margin-top:.3em}"
)


def html_page(results: list[dict], settings: dict) -> str:
    """A self-contained page: the metrics table (reasons as numbered notes and tooltips), the inputs, then the sample grids."""
    esc = html.escape
    labels, keys, notes = run_labels(results), metric_keys(results), missing_notes(results)
    parts = [
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ipl eval report</title><style>{_CSS}</style></head><body>",
        f"<h1>ipl eval report</h1><p class='dim'>{esc(_settings_line(settings))}</p>",
        "<div class='scroll'><table id='metrics'><thead><tr><th>run</th>",
    ]
    for key in keys:
        better = HIGHER_IS_BETTER.get(key.split("[")[0])
        tip = {True: "higher is better", False: "lower is better"}.get(better, "no better direction")
        parts.append(f"<th title='{tip}'>{esc(heading(key))}</th>")
    parts.append("</tr></thead><tbody>")
    for i, (label, r) in enumerate(zip(labels, results)):
        row = [f"<tr><th scope='row' title='{esc(r['name'])} · {esc(r['path'])}'>{esc(label)}</th>"]
        for key in keys:
            mark = notes.marks.get((i, key))
            if mark:
                why = esc(notes.reasons[mark - 1])
                row.append(f"<td class='missing' title='{why}'>{MISSING}<sup><a href='#note-{mark}'>{mark}</a></sup></td>")
            else:
                row.append(f"<td>{esc(format_value(r, key))}</td>")
        parts.append("".join(row) + "</tr>")
    parts.append("</tbody></table></div>")
    if notes.reasons:
        parts.append("<ol class='notes'>" + "".join(f"<li id='note-{n}'>{esc(why)}</li>" for n, why in enumerate(notes.reasons, 1)) + "</ol>")
    parts.append("<p class='dim'>↑ higher is better · ↓ lower is better · – no value (hover it, or see the note)</p>")
    parts.append(
        "<p class='dim'>"
        + "<br>".join(f"<b>{esc(label)}</b>: {esc(r['name'])} ({esc(r['kind'])}) <code>{esc(r['path'])}</code>" for label, r in zip(labels, results))
        + "</p><h2>Samples</h2>"
    )
    for label, r in zip(labels, results):
        if not r.get("samples"):
            continue
        what = "the first pictures of the folder" if r["kind"] == "folder" else "source generator above, adapted below (same latents)"
        parts.append(
            f"<figure><img src='{esc(r['samples'])}' alt='samples of {esc(label)}'>"
            f"<figcaption><b>{esc(label)}</b> <span class='dim'>· {esc(r['name'])} · {esc(what)}</span></figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report_dir: Path, results: list[dict], settings: dict) -> dict[str, Path]:
    """Write metrics.json, metrics.csv, metrics.md and index.html into `report_dir`; returns their paths."""
    report_dir.mkdir(parents=True, exist_ok=True)
    column_names(results)
    paths = {name: report_dir / name for name in ("metrics.json", "metrics.csv", "metrics.md", "index.html")}
    document = {"created": datetime.now().isoformat(timespec="seconds"), "settings": settings, "runs": results}
    atomic_write_text(paths["metrics.json"], json.dumps(document, indent=2, default=str) + "\n")
    atomic_write_text(paths["metrics.csv"], csv_text(results))
    atomic_write_text(paths["metrics.md"], markdown(results, settings))
    atomic_write_bytes(paths["index.html"], html_page(results, settings).encode("utf-8"))
    return paths
