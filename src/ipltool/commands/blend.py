"""`ipl blend`: mix adapted generators of one source into a new generator checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ipltool import console


def blend(
    generators: list[str] = typer.Argument(..., help="Domains (newest finished run), run folders or generator .pt files, adapted from one source.", show_default=False),
    weights: str = typer.Option(..., "--weights", "-w", help="One weight per generator, e.g. 0.5,0.5 (when they do not sum to 1, the source weighs in with the rest)."),
    out: Path = typer.Option(..., "--out", "-o", help="The .pt file to write ({\"g_ema\": ...}, loadable like any adapted generator)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where `ipl adapt` wrote its runs (for domain names)."),
    source_generator: Optional[str] = typer.Option(None, "--source-generator", help="Source generator of .pt files outside run folders (registry name or file)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists."),
    json_output: bool = console.json_option("Print the result as JSON."),
) -> None:
    """Write a generator whose weights mix adapted generators: θ = θ_s + Σ w_i (θ_i − θ_s).

    Weights summing to 1 give Σ w_i θ_i; a single generator with weight α is `--strength α`.
    Generators adapted from different source generators are refused. The file works
    wherever a generator file does: ipl generate -g FILE, ipl stylize -g FILE, ipl eval FILE -d DOMAIN.

    Examples: ipl blend disney pixar-character --weights 0.5,0.5 --out blends/disney-pixar.pt
    |   ipl blend disney --weights 1.5 --out disney-strong.pt
    """
    from ipltool.render.blend import parse_number_list
    from ipltool.render.blend_file import blend_generators

    values = parse_number_list(weights, "--weights")
    path = blend_generators(generators, values, out, runs, source_generator, force)
    if console.wants_json(json_output):
        console.print_json({"out": str(path), "generators": generators, "weights": values})
    else:
        console.out.print(f"wrote {console.escape(path)}  ({' + '.join(f'{w:g}×{g}' for g, w in zip(generators, values))})")
