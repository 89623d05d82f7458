"""Seed lists as people type them: `0-63`, `1,5,9`, `0-3,10,20-22`."""

from __future__ import annotations

from ipltool.errors import UsageError

#: Seeds seed torch generators; sample seeds stay far below eval's centre offset and 2**63.
MAX_SEED = 2**62
#: A bound on one command's pictures, so a typo such as `0-99999999` is refused, not started.
MAX_SEEDS = 100_000


def parse_seeds(text: str) -> list[int]:
    """The seeds of `text`: comma-separated seeds and inclusive ranges `a-b`, in the order given, without repeats.

    Raises:
        UsageError: an empty list, a negative or too large seed, a descending range, or more than `MAX_SEEDS`.
    """
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        first, dash, last = part.partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise UsageError(f"--seeds takes seeds and ranges such as 0-63 or 1,5,9 (got {text!r})") from None
        if low > high:
            raise UsageError(f"--seeds range {part} goes down: write {high}-{low}")
        if high > MAX_SEED:
            raise UsageError(f"--seeds must be at most {MAX_SEED} (got {high})")
        if high - low + 1 + len(seeds) > MAX_SEEDS:
            raise UsageError(f"--seeds {text} names more than {MAX_SEEDS} seeds", hint="render them in several runs")
        seeds.extend(range(low, high + 1))
    return list(dict.fromkeys(seeds))


def seed_range(n: int, start: int) -> list[int]:
    """`n` consecutive seeds from `start` (`--n 100 --seed 7`: 7..106), as `ipl eval` numbers its samples.

    Raises:
        UsageError: `n` out of 1..MAX_SEEDS or seeds out of range.
    """
    if not 1 <= n <= MAX_SEEDS:
        raise UsageError(f"--n must be between 1 and {MAX_SEEDS} (got {n})")
    if not 0 <= start or start + n - 1 > MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED - n + 1} (got {start})")
    return list(range(start, start + n))
