"""`--resume RUN_DIR` of the training commands: the run's stored settings, and the flags that may not change them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipltool.errors import UsageError
from ipltool.outdir import check_output_folder
from ipltool.precision import AUTO

if TYPE_CHECKING:
    from ipltool.domain import Domain
    from ipltool.train.run import RunDir, RunInfo

#: The `[run] stage` each training command writes, and the command that continues it.
COMMANDS = {"adapt": "adapt", "mapper": "train-mapper"}


def domain_of_run(run: RunDir, stage: str) -> tuple[Domain, RunInfo]:
    """The resolved domain and the `RunInfo` stored in a run's config.toml, checked to be of `stage`.

    Args:
        stage: the stage the resuming command continues ("adapt" or "mapper").

    Raises:
        UsageError: the run was made by another command (the hint says how to use it instead).
        DomainError: its config.toml is not a valid domain.
    """
    found = run.read_info().stage
    if found != stage:
        what = {"adapt": "an adapt run", "mapper": "a train-mapper run"}
        if stage == "adapt" and found == "mapper":
            hint = f"to adapt with its mapper: ipl adapt --domain {run.read_config().get('name', 'NAME')} --mapper {run.path}"
        elif found in COMMANDS:
            hint = f"continue it with: ipl {COMMANDS[found]} --resume {run.path}"
        else:
            hint = None
        raise UsageError(f"{run.path} is a {found or 'unknown'!r} run, not {what[stage]}", hint=hint)
    return run.read()


def refuse_changes(flags: dict[str, Any], smoke: bool) -> None:
    """`--resume` keeps a run's settings: refuse every flag given in `flags` (`{"--batch": 4}`; None, False, [] = not given).

    Raises:
        UsageError: naming the flags to drop; only --steps may change.
    """
    extra = [flag for flag, value in flags.items() if value is not None and value is not False and value != []]
    if extra or smoke:
        raise UsageError(
            f"--resume continues a run with its saved settings; drop {', '.join(extra) or '--smoke'}",
            hint="only --steps may change, to extend a run",
        )


def stored_precision(run: RunDir, info: RunInfo, precision: str | None) -> str:
    """The run's own precision; an explicit `--precision` must agree with it (auto always does).

    Raises:
        UsageError: `--precision` names another one.
    """
    stored = info.precision
    if precision not in (None, AUTO) and precision != stored:
        raise UsageError(f"{run.path} runs in {stored}; --resume cannot switch it to {precision}", hint=f"drop --precision to continue in {stored}")
    return stored


def extend_steps(run: RunDir, resolved: Domain, info: RunInfo, key: str, steps: int | None) -> Domain:
    """Apply `--steps` of a resumed run to `key` ("adapt.steps" or "mapper.steps") and store it in config.toml."""
    section, leaf = key.split(".")
    if steps is None or steps == getattr(getattr(resolved, section), leaf):
        return resolved
    resolved = resolved.with_overrides({key: steps}, flags={key: "--steps"})
    run.write(resolved, info)
    return resolved



def continue_run(
    path: Path, stage: str, steps_key: str, given: dict[str, Any], named: dict[str, tuple[str, Any]], smoke: bool, precision: str | None,
    steps: int | None,
) -> tuple[RunDir, Domain, RunInfo, str]:
    """Open the run `--resume PATH` continues, with its own settings.

    Args:
        stage: the stage the command continues ("adapt" or "mapper").
        steps_key: the domain key `--steps` extends ("adapt.steps" or "mapper.steps").
        given: the command's other setting flags (`{"--domain": ..., "--set": ...}`), refused when given.
        named: the command's named flags as `{key: (flag, value)}`; all but `steps_key` are refused when given.
        smoke, precision, steps: the flags as given.

    Returns:
        (run, resolved domain, the run's `RunInfo` (its smoke flag, save_every, ...), the run's precision).

    Raises:
        UsageError: a setting flag was given, the run is another command's, it cannot be
            written to, or `--precision` differs from the run's.
    """
    from ipltool.train.run import RunDir

    refuse_changes({**given, **{flag: value for key, (flag, value) in named.items() if key != steps_key}}, smoke)
    run = RunDir.open(path)
    check_output_folder(run.path, "--resume")
    resolved, info = domain_of_run(run, stage)
    precision = stored_precision(run, info, precision)
    resolved = extend_steps(run, resolved, info, steps_key, steps)
    return run, resolved, info, precision
