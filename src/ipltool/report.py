"""The `ipl eval` report: metrics.json, metrics.csv, metrics.md and index.html with sample grids.

Tables follow the paper's layout: one table per metric, a row per domain, a column per
method (`ipl`, `nada`, `ipl+custom`, or the input's name). Every file is written
atomically; image paths in the HTML page are relative, so the folder can be moved or
zipped and still opens in a browser.
"""

from __future__ import annotations

import csv
import html
import io
import json
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


def column_names(results: list[dict]) -> list[str]:
    """Unique column labels: the method, or `method (run name)` when a domain has two of one method."""
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


def format_value(result: dict, key: str) -> str:
    """`value` or `value ± spread` with 4 significant digits; `-` for a missing value."""
    value = result["metrics"].get(key)
    if value is None:
        return "-"
    text = f"{value:.4g}"
    spread = next((s for s, base in SPREADS.items() if base == key), None)
    if spread and result["metrics"].get(spread) is not None:
        text += f" ± {result['metrics'][spread]:.2g}"
    return text


def tables(results: list[dict]) -> dict[str, tuple[list[str], list[str], dict[tuple[str, str], str]]]:
    """Per metric key: (row domains, columns, {(domain, column): text})."""
    columns = column_names(results)
    rows = list(dict.fromkeys(r["domain"] or "-" for r in results))
    out = {}
    for key in metric_keys(results):
        cells = {(r["domain"] or "-", r["column"]): format_value(r, key) for r in results if key in r["metrics"]}
        out[key] = (rows, columns, cells)
    return out


def _arrow(key: str) -> str:
    better = HIGHER_IS_BETTER.get(key.split("[")[0])
    return " ↑" if better else (" ↓" if better is False else "")


def markdown(results: list[dict]) -> str:
    """The comparison as markdown: one table per metric, then the reasons for missing values."""
    lines = ["# ipl eval report", ""]
    for key, (rows, columns, cells) in tables(results).items():
        lines += [f"## {key}{_arrow(key)}", "", "| domain | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for row in rows:
            lines.append(f"| {row} | " + " | ".join(cells.get((row, c), "") for c in columns) + " |")
        lines.append("")
    notes = [f"- {r['name']}: `{k}` — {why}" for r in results for k, why in r["reasons"].items()]
    if notes:
        lines += ["## Missing values", ""] + notes + [""]
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


def html_page(results: list[dict], settings: dict) -> str:
    """A self-contained page: the tables, then each input's sample grid beside its numbers."""
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ipl eval report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse;margin:0 0 1.5em}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
        "th:first-child,td:first-child{text-align:left}.run{display:flex;gap:2em;margin:1.5em 0;align-items:flex-start}"
        ".run img{max-width:640px;image-rendering:pixelated;border:1px solid #ddd}.dim{color:#777}</style></head><body>",
        f"<h1>ipl eval report</h1><p class='dim'>{esc(datetime.now().strftime('%Y-%m-%d %H:%M'))} · "
        f"weights: {esc(str(settings.get('weights')))} · seed {esc(str(settings.get('seed')))} · ψ {esc(str(settings.get('truncation')))}</p>",
    ]
    for key, (rows, columns, cells) in tables(results).items():
        parts.append(f"<h2>{esc(key + _arrow(key))}</h2><table><tr><th>domain</th>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>")
        for row in rows:
            parts.append(f"<tr><td>{esc(row)}</td>" + "".join(f"<td>{esc(cells.get((row, c), ''))}</td>" for c in columns) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Samples</h2>")
    for r in results:
        numbers = "".join(f"<tr><td>{esc(k)}</td><td>{esc(format_value(r, k))}</td></tr>" for k in r["metrics"] if k not in SPREADS)
        caption = "top: source generator, bottom: adapted (same latents)" if r["kind"] != "folder" else "first pictures of the folder"
        image = f"<img src='{esc(r['samples'])}' alt='samples of {esc(r['name'])}'>" if r.get("samples") else ""
        parts.append(
            f"<div class='run'><figure>{image}<figcaption class='dim'>{esc(caption)}</figcaption></figure>"
            f"<div><h3>{esc(r['name'])}</h3><p class='dim'>{esc(r['domain'] or '-')} · {esc(r['label'])} · {esc(r['kind'])}</p>"
            f"<table>{numbers}</table></div></div>"
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
    atomic_write_text(paths["metrics.md"], markdown(results))
    atomic_write_bytes(paths["index.html"], html_page(results, settings).encode("utf-8"))
    return paths
