"""Style strength and blends: generators whose weights mix a source and its adapted generators.

Every variant is one formula over the state dicts of a source generator θ_s and adapted
generators θ_i of that source, with weights w_i:

    θ = θ_s + Σ w_i (θ_i − θ_s)  =  (1 − Σ w_i) θ_s + Σ w_i θ_i

`--strength α` is one term (0: the source, 1: the adapted generator, between: a weaker
style, above 1: an exaggerated one); `--blend disney=0.5 --blend werewolf=0.5` is several.
The right-hand form is evaluated in float64 and rounded once, so α = 0 gives the source and
α = 1 the adapted generator bit for bit. Entries equal in every generator (the frozen
layers, the constant noise) are copied, not recomputed: only layers that differ are blended.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch

from ipltool.errors import CheckpointError, UsageError
from ipltool.models.stylegan2 import Generator

#: Mapping-network weights of generators adapted from one source agree to this relative
#: tolerance (adaptation freezes the mapping; the EMA of G_ema rounds it by an ulp or two).
SAME_SOURCE_RTOL = 1e-4


def parse_number_list(text: str, flag: str) -> list[float]:
    """`"0,0.25,1"` as finite numbers, for `flag`.

    Raises:
        UsageError: an empty list or an item that is not a finite number.
    """
    values = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            raise UsageError(f"{flag} takes numbers separated by commas, e.g. 0,0.5,1 (got {text!r})") from None
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be finite numbers (got {item!r})")
        values.append(value)
    return values


def parse_blend(items: Sequence[str]) -> list[tuple[str, float]]:
    """`--blend NAME=WEIGHT` values as (name, weight) pairs.

    Raises:
        UsageError: an item without `=`, a weight that is not a finite number, a repeated name,
            or a single item (a blend needs two generators; one is `--strength`).
    """
    pairs: list[tuple[str, float]] = []
    for item in items:
        name, sep, weight = item.rpartition("=")
        if not sep or not name.strip():
            raise UsageError(f"--blend takes NAME=WEIGHT, e.g. --blend disney=0.5 (got {item!r})")
        (value,) = parse_number_list(weight, f"--blend {name}")
        if name in (n for n, _ in pairs):
            raise UsageError(f"--blend names {name!r} twice")
        pairs.append((name.strip(), value))
    if len(pairs) == 1:
        raise UsageError("--blend needs at least two generators", hint=f"for one generator use --strength {pairs[0][1]:g}")
    return pairs


def strength_label(label: str, alpha: float) -> str:
    """The column/folder name of `label` at strength `alpha`: the label itself at 1, else `label-s0.5`."""
    return label if alpha == 1 else f"{label}-s{alpha:g}"


def blend_label(pairs: Sequence[tuple[str, float]]) -> str:
    """The column/folder name of a blend: `blend-disney0.5-werewolf0.5`."""
    return "blend-" + "-".join(f"{name}{weight:g}" for name, weight in pairs)


def check_same_source(source: dict[str, torch.Tensor] | None, states: Sequence[dict[str, torch.Tensor]], names: Sequence[str]) -> None:
    """Refuse generators that cannot be mixed: other architectures, or adapted from other sources.

    Args:
        source: the source's state dict (None: compare the generators among themselves).
        states: the adapted generators' state dicts.
        names: their names, for the message (the source is "the source generator").

    Raises:
        CheckpointError: different keys or shapes (architectures), or mapping networks
            that differ (another source: adaptation never changes the mapping network).
    """
    pool = ([("the source generator", source)] if source is not None else []) + list(zip(names, states))
    first_name, first = pool[0]
    for name, state in pool[1:]:
        if state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first):
            raise CheckpointError(f"{name} and {first_name} are different architectures: their weights cannot be mixed")
        for key in (k for k in first if k.startswith("style.")):
            a, b = first[key].double(), state[key].double()
            if not torch.allclose(a, b, rtol=SAME_SOURCE_RTOL, atol=SAME_SOURCE_RTOL * float(a.abs().max())):
                raise CheckpointError(
                    f"{name} and {first_name} come from different source generators (their mapping networks differ)",
                    hint="mix only generators adapted from the same source generator",
                )


def mix_states(source: dict[str, torch.Tensor] | None, terms: Sequence[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
    """`(1 − Σ w_i) θ_s + Σ w_i θ_i` for every entry (see the module docstring).

    Args:
        source: θ_s; may be None only when the weights sum to 1 (its coefficient is 0).
        terms: (θ_i, w_i) pairs, at least one.

    Raises:
        UsageError: no source while the weights do not sum to 1.
    """
    total = sum(weight for _, weight in terms)
    rest = 1.0 - total
    if source is None and abs(rest) > 1e-9:
        raise UsageError(
            f"weights summing to {total:g} mix in the source generator (weight {rest:g}), which is unknown here",
            hint="give weights that sum to 1, or name the source with --source-generator",
        )
    base = source if source is not None else terms[0][0]
    mixed = {}
    for key, value in base.items():
        values = [state[key] for state, _ in terms]
        if all(torch.equal(value, v) for v in values):
            mixed[key] = value.clone()
            continue
        if not value.is_floating_point():
            raise CheckpointError(f"{key!r} differs between the generators and is not a float: it cannot be blended")
        total_value = (value.double() * rest) if source is not None else torch.zeros_like(value, dtype=torch.float64)
        for v, weight in zip(values, (w for _, w in terms)):
            total_value = total_value + v.double() * weight
        mixed[key] = total_value.to(value.dtype)
    return mixed


def mixed_generator(source: Generator | None, terms: Sequence[tuple[Generator, float]], names: Sequence[str]) -> Generator:
    """A new generator with the weights `θ_s + Σ w_i (θ_i − θ_s)`, on the first generator's device.

    Args:
        source: the source generator (None: the weights must sum to 1).
        terms: (adapted generator, weight) pairs.
        names: the generators' names, for messages.

    Raises:
        CheckpointError: generators of other architectures or sources (`check_same_source`).
        UsageError: no source while the weights do not sum to 1.
    """
    states = [generator.state_dict() for generator, _ in terms]
    source_state = source.state_dict() if source is not None else None
    check_same_source(source_state, states, names)
    mixed = mix_states(source_state, [(state, weight) for state, (_, weight) in zip(states, terms)])
    result = copy.deepcopy(terms[0][0])
    result.load_state_dict(mixed)
    return result.eval().requires_grad_(False)
