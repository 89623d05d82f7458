"""Command-line flags that override domain keys: `--set KEY=VALUE` and `--clip MODEL[:TAG][=WEIGHT]`.

Training commands apply, in order: the domain file, `--smoke`'s settings, `--set`
and `--clip`, then their own named flags (`--steps`, `--lr`, ...). Each layer is
validated again, so a bad value is reported with its key (`override: key 'adapt.steps':
...` for `--set`), or in the words of the named flag that set it (`--steps must be ≥ 1
(got -5)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ipltool import tomlio
from ipltool.errors import UsageError

if TYPE_CHECKING:
    from ipltool.domain import Domain


SET_HELP = "Override any domain key, e.g. --set adapt.ema=0.995 or --set 'ctx_init=\"a picture of a\"' (repeatable)."
CLIP_HELP = "CLIP model of the loss as MODEL[:PRETRAINED][=WEIGHT], e.g. ViT-B/16:openai=0.5; repeat for several (replaces the domain's list)."


# The flags every training command shares, defined once (typer reads them as defaults).


def domain_option(help_text: str = "Domain name (`ipl prompts list`) or .toml file."):
    """`--domain/-d NAME_OR_FILE`."""
    return typer.Option(None, "--domain", "-d", help=help_text)


def clip_option():
    """`--clip MODEL[:TAG][=WEIGHT]`, repeatable."""
    return typer.Option(None, "--clip", help=CLIP_HELP)


def set_option():
    """`--set KEY=VALUE`, repeatable."""
    return typer.Option(None, "--set", help=SET_HELP)


def runs_option():
    """`--out`: the parent folder of new run directories."""
    return typer.Option(Path("runs"), "--out", help="Parent directory of the run directory.")


def save_every_option():
    """`--save-every N`: steps between resume states."""
    return typer.Option(50, min=1, help="Save the resume state every N steps (Ctrl-C also saves it).")


def chunk_option(stages: str, example: str = ""):
    """`--chunk N` of the training commands; `stages` names what renders in chunks there, `example` a setting for a small GPU."""
    return typer.Option(
        8, "--chunk", min=1,
        help=f"Images rendered at once by {stages}: lower it when memory runs out{example}; the results stay the same to float rounding.",
    )


def smoke_option():
    """`--smoke`: tiny random models."""
    return typer.Option(False, "--smoke", help="Run the whole pipeline on tiny random models, in seconds.")


def parse_value(text: str) -> Any:
    """A flag value as TOML (numbers, booleans, quoted strings, arrays), else the bare text.

    Raises:
        UsageError: a value nested too deeply for the TOML parser.
    """
    try:
        return tomlio.loads(f"value = {text}")["value"]
    except tomlio.TOMLDecodeError:
        return text
    except RecursionError:  # tomllib recurses once per level of nesting
        raise UsageError("a --set value has arrays or tables nested too deeply", hint="a domain key needs a few levels at most") from None


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`["adapt.ema=0.995", ...]` as dotted overrides.

    Raises:
        UsageError: an item without `=`.
    """
    overrides: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE", hint="for example --set adapt.ema=0.995")
        overrides[key.strip()] = parse_value(text.strip())
    return overrides


def parse_clips(items: list[str] | None) -> list[dict] | None:
    """`--clip` values as the domain's `clip` list (None when the flag is not given).

    The model names are checked when the models are built (`build_models`), the same
    way with and without `--smoke`.

    Raises:
        UsageError: an empty model name, or a weight that is not a number.
    """
    if not items:
        return None
    clips = []
    for item in items:
        spec, _, weight = item.partition("=")
        model, _, pretrained = spec.partition(":")
        if not model.strip():
            raise UsageError(f"--clip {item!r}: no model name", hint="expected MODEL[:PRETRAINED][=WEIGHT], e.g. --clip ViT-B/32")
        entry: dict[str, Any] = {"model": model.strip()}
        if pretrained.strip():
            entry["pretrained"] = pretrained.strip()
        if weight.strip():
            try:
                entry["weight"] = float(weight)
            except ValueError:
                raise UsageError(f"--clip {item!r}: weight {weight!r} is not a number") from None
        clips.append(entry)
    return clips


def apply_flags(
    domain: Domain, smoke_overrides: dict | None, sets: list[str] | None, clips: list[str] | None, named: dict[str, tuple[str, Any]]
) -> Domain:
    """The domain with every override layer applied in the documented order.

    Args:
        named: the command's own flags as `{domain key: (flag, value)}`, e.g.
            `{"adapt.steps": ("--steps", 300)}`; a None value leaves the key alone, and
            a bad value is reported with the flag's name.
    """
    if smoke_overrides:
        domain = domain.with_overrides(smoke_overrides)
    domain = domain.with_overrides(parse_sets(sets))
    domain = domain.with_overrides({"clip": parse_clips(clips)})
    return domain.with_overrides({key: value for key, (_, value) in named.items()}, flags={key: flag for key, (flag, _) in named.items()})
