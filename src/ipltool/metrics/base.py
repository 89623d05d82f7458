"""What every metric network shares: the `Extractor` interface, weights lookup, cache keys.

An extractor turns a batch of uint8 pictures into named feature tensors; the formulas in
`formulas.py` turn features into numbers. Real weights come from the model cache
(`hub.ensure`) or from a path the user gives, never from a download started by
torch-fidelity, torchvision or open_clip. Missing weights raise `MetricUnavailable`, so
`ipl eval` can report that metric as null with the reason instead of faking it.
"""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch

from ipltool import hub
from ipltool.download import DownloadError, sha256_file
from ipltool.errors import CheckpointError, IplError, UsageError

# Bumped whenever an extractor's preprocessing or output changes, so cached features
# computed by an older version never match a new key.
FEATURES_VERSION = 1
RANDOM_TEST = "random-test"
HASH_CHARS = 12  # sha256 prefix written into keys and reports


class MetricUnavailable(IplError):
    """A metric cannot be computed here: its weights are missing (offline), or a package is not installed.

    `message` is the reason in one line (it goes into the report next to the null value);
    `hint` says how to get what is missing.
    """


# ----------------------------------------------------------------------------
# The interface


class Extractor:
    """A frozen metric network: uint8 pictures in, named CPU feature tensors out.

    Subclasses set the attributes below and implement `extract`.

    Attributes:
        name: the extractor's name, one of `EXTRACTORS`.
        key: cache identity: name, settings, features version and the weights' sha256
            prefix (or "random-test" / "sobel"). Equal keys give identical features (up
            to floating-point differences between devices). An opaque string with `|`
            and JSON in it: hash it to make a file name.
        weights: "real" (numbers mean something) or "random-test" (smoke runs only).
        info: what goes into the report's `meta` (backbone, layer, weights file, hash...).
        device: where the network runs.
    """

    name: str = ""
    key: str = ""
    weights: str = "real"
    info: dict[str, Any]
    device: torch.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self.key!r}, device={self.device})"

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of a batch of pictures.

        Args:
            images: (B, 3, H, W) uint8 RGB, any size, on any device.

        Returns:
            Feature name -> CPU tensor whose first dimension is B, rows in input order.
        """
        images = check_images(images)
        with torch.no_grad():  # not inference_mode: callers may edit or stack the results freely
            features = self.extract(images.to(self.device))
        return {k: v.detach().cpu() for k, v in features.items()}

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network itself: (B, 3, H, W) uint8 on `self.device` -> features."""
        raise NotImplementedError


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Check that `images` is a (B, 3, H, W) uint8 tensor; returns it unchanged.

    Raises:
        ValueError: another dtype or shape (a programming error, not a user's).
    """
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        dtype = images.dtype if torch.is_tensor(images) else ""
        raise ValueError(f"metric extractors take (B, 3, H, W) uint8 pictures, got {shape} {dtype}")
    return images


def make_key(name: str, settings: dict[str, Any], tag: str) -> str:
    """The cache key `name|v<version>|<settings as sorted JSON>|<weights tag>`."""
    return f"{name}|v{FEATURES_VERSION}|{json.dumps(settings, sort_keys=True, separators=(',', ':'))}|{tag}"


# ----------------------------------------------------------------------------
# Weights


def weights_file(hub_name: str, weights: str | Path | None) -> Path:
    """The weights file of a metric: the user's path, else the cache file (fetched on first use).

    Args:
        hub_name: registry name of the default file (e.g. "inception-fid").
        weights: a path given by the user (`--inception-weights`...), or None.

    Returns:
        An existing file.

    Raises:
        UsageError: the given path does not exist (a typo should stop the run, not
            quietly turn the metric into null).
        MetricUnavailable: the cache file is missing and downloads are off, or every
            download mirror failed; the hint names the `ipl fetch` command.
        CheckpointError: the cache file's sha256 is not the known one.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UsageError(f"weights file not found: {path}", hint=f"give the path of a copy of {hub_name}, or leave it out to use the cache")
        return path
    try:
        path = hub.ensure(hub_name)
    except (UsageError, DownloadError) as err:
        raise MetricUnavailable(err.message, hint=err.hint or hub.missing_hint(hub_name)) from None
    # A cache file whose sha256 is known must still be that file before anything reads it
    # (the digest is computed once per process, and the weights tag needs it anyway).
    hashes = hub.known_hashes(hub.get_model(hub_name))
    if hashes and file_digest(path) not in hashes:
        raise CheckpointError(
            f"the cached {hub_name} ({path}) does not match its known sha256", hint=f"fetch it again: ipl fetch --force {hub_name}"
        )
    return path


def file_digest(path: str | Path) -> str:
    """sha256 of a weights file, hashed once per process while its size and mtime stay the same."""
    path = Path(path).resolve()
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def weights_tag(path: str | Path) -> str:
    """`sha256:<prefix>` of a weights file, the part of a key that names the weights."""
    return f"sha256:{file_digest(path)[:HASH_CHARS]}"


def weights_info(path: str | Path) -> dict[str, str]:
    """Report fields of a weights file: its name and full sha256."""
    return {"weights_file": Path(path).name, "sha256": file_digest(path)}


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a `torch.save` file, read without running pickled code.

    Read by `checkpoints.read` (weights only, bounded sizes); every floating tensor must
    be finite.

    Raises:
        CheckpointError: the file cannot be read, is unsafe, does not hold a dict of
            tensors, or holds NaN or inf.
    """
    from ipltool import checkpoints

    state = checkpoints.read(path, "weights file")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a dict of tensors)")
    checkpoints.check_finite(state, path)
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """`load_state_dict(strict=True)`, except that BatchNorm's `num_batches_tracked` may be absent.

    Files saved before PyTorch 0.4.1 have no `num_batches_tracked`; it is never used in eval
    mode, so the module keeps its own. Every other missing or unexpected key is an error.

    Raises:
        CheckpointError: keys or shapes do not match; the message shows a few of them.
    """
    own = module.state_dict()
    state = dict(state)
    for k in own:
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = own[k]
    from ipltool import checkpoints

    checkpoints.load_strict(module, state, path, f"a {what}", hint=f"give a {what} weights file")


# ----------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the CPU RNG seeded, leaving the caller's RNG as it was (random inits)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def check_settings(name: str, settings: dict[str, Any], allowed: dict[str, tuple[Any, Any]]) -> dict[str, Any]:
    """Validate an extractor's settings and fill in the defaults.

    Args:
        name: the extractor, for messages.
        settings: what the caller passed.
        allowed: setting -> (default, allowed): a tuple of allowed values, None for "a
            positive int", or a type (any value of that type, or None when the default is None).

    Returns:
        Every setting of `allowed`, given or default.

    Raises:
        UsageError: an unknown setting or a value that is not allowed.
    """
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        raise UsageError(f"unknown setting(s) for the {name} extractor: {', '.join(unknown)}", hint=f"known: {', '.join(allowed) or 'none'}")
    out = {}
    for key, (default, choices) in allowed.items():
        value = settings.get(key, default)
        if choices is None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} extractor: {key} must be a positive integer, got {value!r}")
        elif isinstance(choices, type):
            if not (isinstance(value, choices) or (value is None and default is None)):
                raise UsageError(f"{name} extractor: {key} must be a {choices.__name__}, got {value!r}")
        elif value not in choices:
            raise UsageError(f"{name} extractor: {key}={value!r} is not one of {', '.join(map(repr, choices))}")
        out[key] = value
    return out


def import_or_unavailable(module: str, what: str, hint: str):
    """Import an optional dependency, or raise `MetricUnavailable` saying which metric needs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MetricUnavailable(f"{what} needs the Python package {module.split('.')[0]} ({err})", hint=hint) from None
