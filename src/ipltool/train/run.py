"""Run directories: where a training run keeps its config, checkpoints, samples and log.

Layout of `runs/<domain>-<YYYYmmdd-HHMMSS>/`:

    config.toml     the resolved config (domain file + flag overrides)
    mapper.pt       stage-1 mapper weights
    generator.pt    stage-2 generator, `{"g_ema": state_dict}`
    samples/        sample grids written during training
    log.jsonl       one JSON object per line per step (losses, chosen layers, seconds)
    state.pt        everything needed to resume: step, weights, optimizers, RNG states

Every file except the log is written to a hidden temporary name in the same
directory and renamed over the final name, so an interrupted run never leaves a
half-written checkpoint. The log is append-only; a line cut short by a kill is
ignored on read and dropped before the next append.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ipltool import tomlio
from ipltool.atomic import atomic_torch_save, atomic_write_bytes, atomic_write_text, sweep_stale_temps
from pydantic import BaseModel, ConfigDict, ValidationError

from ipltool.domain import NAME_PATTERN, Domain
from ipltool.errors import RunConfigError, UsageError

__all__ = ["RunDir", "RunInfo", "capture_rng_state", "finished_runs", "restore_rng_state"]

try:
    import numpy as np
except ImportError:  # pragma: no cover
    np = None

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.toml"
MAPPER_NAME = "mapper.pt"
GENERATOR_NAME = "generator.pt"
STATE_NAME = "state.pt"
LOG_NAME = "log.jsonl"
SAMPLES_NAME = "samples"

_DOMAIN_NAME = re.compile(NAME_PATTERN)

# ---------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every random generator a training step may draw from.

    Returns:
        A dict loadable with `torch.load(weights_only=True)`:
        `"torch"`: CPU generator state, uint8 tensor;
        `"cuda"`: list of uint8 tensors, one per device (only when CUDA is available);
        `"python"`: `[version, [625 ints], gauss or None]` from `random.getstate()`;
        `"numpy"`: `{"name", "key" (int64 tensor of 624), "pos", "has_gauss",
        "cached_gaussian"}` from `numpy.random.get_state()` (only when numpy is installed).
    """
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    if np is not None:
        name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {
            "name": str(name),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back the generators saved by `capture_rng_state`.

    Entries that do not apply here are skipped with a warning: CUDA states on a
    machine without CUDA (extra devices likewise), numpy's state without numpy.

    Args:
        state: the dict from `capture_rng_state`, possibly after a save/load round trip
            (tensors may be on any device).
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    cuda_states = state.get("cuda")
    if cuda_states:
        n_here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for index, s in enumerate(cuda_states[:n_here]):
            torch.cuda.set_rng_state(s.cpu(), index)
        if len(cuda_states) > n_here:
            logger.warning("RNG state of %d CUDA device(s) not restored: only %d here", len(cuda_states), n_here)
    saved_np = state.get("numpy")
    if saved_np is not None:
        if np is None:  # pragma: no cover
            logger.warning("numpy RNG state not restored: numpy is not installed")
        else:
            np.random.set_state(
                (
                    saved_np["name"],
                    saved_np["key"].cpu().numpy().astype(np.uint32),
                    int(saved_np["pos"]),
                    int(saved_np["has_gauss"]),
                    float(saved_np["cached_gaussian"]),
                )
            )


# ---------------------------------------------------------------------------
# Helpers for config and log


def _config_bytes(config: dict) -> bytes:
    return tomlio.dumps(config).encode("utf-8")


def _json_default(obj: Any) -> Any:
    """Turn tensors, numpy scalars/arrays and paths into JSON values."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return obj.item() if obj.dim() == 0 else obj.tolist()
    if np is not None and isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"log record value of type {type(obj).__name__} is not JSON serializable")


def _dump_record(record: dict) -> str:
    if not isinstance(record, dict):
        raise TypeError(f"a log record must be a dict, not {type(record).__name__}")
    return json.dumps(record, default=_json_default)


def _parse_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------------------
# The [run] table


class RunInfo(BaseModel):
    """How a run was made: the `[run]` table of its config.toml, beside the resolved domain.

    Reading is lenient (unknown keys are ignored, missing ones take the defaults of runs
    made before they existed), so every run ever written can be opened; `stage` is None
    for a config without a `[run]` table.
    """

    model_config = ConfigDict(extra="ignore")

    stage: str | None = None  # "mapper" (train-mapper) or "adapt"
    smoke: bool = False
    device: str = "cpu"
    precision: str = "fp32"  # runs made before --precision existed are fp32
    save_every: int = 50
    mapper_from: str | None = None  # adapt --mapper: where stage 1 came from

    def table(self) -> dict[str, Any]:
        """The `[run]` table as written to config.toml (None values left out)."""
        return self.model_dump(exclude_none=True)


def finished_runs(domain: str, runs_root: str | os.PathLike) -> list[tuple[Path, RunInfo]]:
    """Every finished adapt run of `domain` under `runs_root`, newest first, with its `RunInfo`.

    Run folders are named `<domain>-<YYYYmmdd-HHMMSS>[-N]` (`RunDir.create`), so the name
    sorts by time; a run counts once it has its `generator.pt` and its `[run] stage` is
    "adapt". Runs whose config cannot be read are left out.
    """
    pattern = re.compile(rf"^{re.escape(domain)}-\d{{8}}-\d{{6}}(-\d+)?$")
    root = Path(runs_root)
    if not root.is_dir():
        return []
    found = []
    for path in sorted((p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)), reverse=True):
        if not (path / GENERATOR_NAME).is_file():
            continue  # still training, or interrupted before the end
        try:
            info = RunDir.open(path).read_info()
        except UsageError:
            continue
        if info.stage == "adapt":
            found.append((path, info))
    return found


# ---------------------------------------------------------------------------
# The run directory


class RunDir:
    """One training run's directory (see the module docstring for the layout).

    Build one with `RunDir.create` (new run) or `RunDir.open` (resume, report).

    Args:
        path: the run directory; not checked here.
    """

    def __init__(self, path: str | os.PathLike):
        self._path = Path(path)
        self._log_tail_checked = False

    def __repr__(self) -> str:
        return f"RunDir({str(self._path)!r})"

    def __fspath__(self) -> str:
        return str(self._path)

    # -- construction ------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        domain_name: str,
        config: dict,
        now: datetime | None = None,
    ) -> RunDir:
        """Make a fresh run directory `root/<domain>-<YYYYmmdd-HHMMSS>` and write its config.

        An existing directory is never reused: when the name is taken, `-2`, `-3`, ...
        is appended until `mkdir` succeeds (safe against two runs starting together).

        Args:
            root: parent folder (`runs/`); created if missing.
            domain_name: the domain's name, as in domain files (`domain.NAME_PATTERN`).
            config: the resolved config as a plain dict; None values are dropped
                (recursively, in arrays too) since TOML has no null.
            now: timestamp for the name; default the local time now.

        Returns:
            The new `RunDir`, with `samples/` and `config.toml` in place.

        Raises:
            UsageError: `domain_name` is not a valid domain name.
        """
        if not _DOMAIN_NAME.match(domain_name):
            raise UsageError(
                f"invalid domain name for a run directory: {domain_name!r}",
                hint="use letters, digits, '_', '.' and '-', starting with a letter or digit",
            )
        # Serialize first so an unserializable config leaves no empty run dir behind.
        config_bytes = _config_bytes(config)
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        stem = f"{domain_name}-{(now or datetime.now()):%Y%m%d-%H%M%S}"
        suffix = 1
        while True:
            path = root / (stem if suffix == 1 else f"{stem}-{suffix}")
            try:
                path.mkdir()
                break
            except FileExistsError:
                suffix += 1
        run = cls(path)
        run.samples_dir.mkdir()
        atomic_write_bytes(run.config_path, config_bytes)
        return run

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDir:
        """An existing run directory, cleared of the temporary files of writers that were killed.

        Args:
            path: the directory (the one holding `config.toml`).

        Returns:
            The `RunDir`.

        Raises:
            UsageError: `path` is not a directory or has no `config.toml`.
        """
        path = Path(path)
        if not path.is_dir():
            raise UsageError(
                f"not a run directory: {path} (no such directory)",
                hint="pass a folder made by a training command, such as runs/<domain>-<timestamp>",
            )
        if not (path / CONFIG_NAME).is_file():
            raise UsageError(
                f"not a run directory: {path} (no {CONFIG_NAME})",
                hint="pass a folder made by a training command, such as runs/<domain>-<timestamp>",
            )
        sweep_stale_temps(path)  # a live writer's (another process resuming or evaluating) stays
        return cls(path)

    # -- paths ---------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The run directory."""
        return self._path

    @property
    def config_path(self) -> Path:
        """`config.toml`, the resolved config."""
        return self._path / CONFIG_NAME

    @property
    def mapper_path(self) -> Path:
        """`mapper.pt`, the stage-1 mapper weights."""
        return self._path / MAPPER_NAME

    @property
    def generator_path(self) -> Path:
        """`generator.pt`, the adapted generator `{"g_ema": state_dict}`."""
        return self._path / GENERATOR_NAME

    @property
    def state_path(self) -> Path:
        """`state.pt`, the resume state."""
        return self._path / STATE_NAME

    @property
    def log_path(self) -> Path:
        """`log.jsonl`, one JSON object per step."""
        return self._path / LOG_NAME

    @property
    def samples_dir(self) -> Path:
        """`samples/`, sample grids written during training."""
        return self._path / SAMPLES_NAME

    # -- config --------------------------------------------------------------

    def read_config(self) -> dict:
        """Read `config.toml`.

        Returns:
            The resolved config (keys that were None when written are absent).

        Raises:
            UsageError: the file is missing or is not valid TOML.
        """
        try:
            with open(self.config_path, "rb") as f:
                return tomlio.load(f)
        except FileNotFoundError:
            raise UsageError(f"not a run directory: {self._path} (no {CONFIG_NAME})") from None
        except tomlio.TOMLDecodeError as e:
            raise UsageError(f"{self.config_path}: invalid TOML: {e}") from None
        except RecursionError:  # tomllib recurses once per level of nesting
            raise UsageError(f"{self.config_path}: invalid TOML: arrays or tables nested too deeply") from None

    def write_config(self, config: dict) -> None:
        """Replace `config.toml` atomically (used when a resumed run is extended)."""
        atomic_write_bytes(self.config_path, _config_bytes(config))

    def read_info(self) -> RunInfo:
        """The `[run]` table of `config.toml`, without validating the domain.

        Raises:
            UsageError: the config is missing, not TOML, or its `[run]` table is malformed.
        """
        table = self.read_config().get("run", {})
        try:
            return RunInfo.model_validate(table if isinstance(table, dict) else {"stage": table})
        except ValidationError as err:
            raise UsageError(f"{self.config_path}: invalid [run] table ({err.errors()[0]['msg']})") from None

    def read(self) -> tuple[Domain, RunInfo]:
        """The resolved domain and the `RunInfo` stored in `config.toml`.

        Raises:
            UsageError: the config cannot be read (see `read_info`).
            RunConfigError: the rest of it is not a valid domain; the message names the file,
                and `reason` holds pydantic's first message.
        """
        config = self.read_config()
        info = self.read_info()
        config.pop("run", None)
        try:
            return Domain.model_validate(config), info
        except ValidationError as err:
            reason = err.errors()[0]["msg"]
            raise RunConfigError(f"{self.config_path}: not a valid run config ({reason})", reason) from None

    def write(self, domain: Domain, info: RunInfo) -> None:
        """Replace `config.toml` with `domain` and `info` (a resumed run that is extended)."""
        self.write_config({**domain.to_toml_dict(), "run": info.table()})

    # -- step log ------------------------------------------------------------

    def log(self, record: dict) -> None:
        """Append one record to `log.jsonl` as a single JSON line, then flush and fsync.

        Tensors and numpy values become numbers (0-d) or lists; NaN and infinities are
        written as `NaN`/`Infinity`, which `json.loads` reads back.

        Args:
            record: one step's values, e.g. `{"step": 10, "loss": 0.31, "seconds": 0.2}`.

        Raises:
            TypeError: `record` is not a dict or holds a value JSON cannot represent.
        """
        line = (_dump_record(record) + "\n").encode("utf-8")
        if not self._log_tail_checked:
            self._repair_log_tail()
            self._log_tail_checked = True
        with open(self.log_path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def _repair_log_tail(self) -> None:
        """Finish or cut a last line left without newline by a killed run, so appends stay one per line."""
        try:
            size = self.log_path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.log_path, "rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            if _parse_record(data[cut:]) is not None:
                f.write(b"\n")
            else:
                f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())

    def read_log(self) -> list[dict]:
        """Read `log.jsonl`.

        A last line cut short (no newline, not valid JSON) is skipped: that is what
        a run killed mid-write leaves. Blank lines are ignored.

        Returns:
            The records in file order; `[]` when there is no log yet.

        Raises:
            UsageError: a complete line that is not a JSON object (a damaged file).
        """
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return []
        lines = data.split(b"\n")
        records: list[dict] = []
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            record = _parse_record(line)
            if record is None:
                raise UsageError(
                    f"{self.log_path}:{number}: not a JSON object",
                    hint="the log is damaged; fix or delete that line",
                )
            records.append(record)
        if lines[-1].strip():
            record = _parse_record(lines[-1])
            if record is not None:
                records.append(record)
        return records

    def truncate_log(self, after_step: int, stage: str | None = None) -> int:
        """Drop the records of steps after `after_step`, rewriting the log atomically.

        Used on resume: steps logged after the last saved state are run again, and
        their old records must not stay as duplicates. Records without a `"step"` key
        are kept; a cut-short last line is dropped.

        Args:
            after_step: the step of the state being resumed from.
            stage: only records whose `"stage"` is this are dropped (None: any record).

        Returns:
            How many records were dropped (0 when there is no log).
        """
        if not self.log_path.exists():
            return 0
        records = self.read_log()
        kept = [
            r
            for r in records
            if "step" not in r or r["step"] <= after_step or (stage is not None and r.get("stage") != stage)
        ]
        atomic_write_text(self.log_path, "".join(_dump_record(r) + "\n" for r in kept))
        self._log_tail_checked = True
        return len(records) - len(kept)

    # -- resume state ----------------------------------------------------------

    def save_state(self, state: dict) -> None:
        """Write `state.pt` atomically.

        Args:
            state: tensors, plain Python numbers/strings/lists/dicts and RNG states
                (`capture_rng_state()`), e.g. `{"step": 500, "mapper": sd, "optim": sd,
                "rng": capture_rng_state()}`. Store the step here, never in a filename.
        """
        if not isinstance(state, dict):
            raise TypeError(f"a run state must be a dict, not {type(state).__name__}")
        atomic_torch_save(state, self.state_path)

    def load_state(self, map_location: str | torch.device = "cpu") -> dict | None:
        """Read `state.pt` with `checkpoints.read` (weights only, bounded sizes, a dict).

        Only the file is checked here; the caller checks the contents against its run
        with `checkpoints.validate_state` before using any of it.

        Args:
            map_location: where tensors go, default CPU.

        Returns:
            The state dict, or None when the run has not saved one yet.

        Raises:
            CheckpointError: the file exists but cannot be read as a weights-only dict.
        """
        from ipltool import checkpoints

        if not self.state_path.exists():
            return None
        # Read whole, not memory-mapped: resumed optimizer states are updated in place.
        return checkpoints.read(
            self.state_path, "resume state", mmap=False, map_location=map_location,
            hint="the file is damaged or was not written by ipltool; delete it to start over",
        )
