"""Reading weights files a user names: safely, within bounds, and validated before anything is built.

Every `.pt`/`.pth` ipltool opens (generators, mappers, encoders, `state.pt`, metric
networks, eval feature caches, files put into the cache by `ipl fetch --import`) goes
through `read`, which:

1. refuses a missing, empty (0 bytes) or non-regular file with one line naming it;
2. for a zip-format file (what `torch.save` writes) reads the zip directory first and
   refuses a file whose entries declare far more data than the file holds (a zip bomb:
   `torch.save` never compresses, so honest files declare about their own size);
3. loads with `torch.load(weights_only=True)`: only tensors, dicts, lists, numbers and
   strings are built, so no code from the file runs (a pickle asking for anything else
   is refused); `mmap=True` for zip files, so tensors are paged in from the file;
4. compares the bytes the loaded tensors declare with the file size (a small file
   cannot describe gigabytes of tensors through strided views).

The validators below run on what `read` returns, before any module is built:
`check_finite` (every floating tensor finite), `tensor_dict` (a state dict of tensors),
`check_number` (a config value's type and range), `mapper_args` (a mapper's constructor
arguments), `check_shapes` (keys and shapes against a template), and `validate_state`
(a resume `state.pt` against the live modules and optimizers). A generator's config is
checked against `GENERATOR_LIMITS` and its weights by `ipltool.models.stylegan2`
(`generator_config`, `check_generator_fits`).

Ranges (`GENERATOR_LIMITS`, `MAPPER_LIMITS`) are those of the released models with a
margin; the sources are given next to each value. This module imports nothing of ipltool
but `errors`, and torch only lazily, so command modules can import it.
"""

from __future__ import annotations

import math
import os
import pickle
import stat
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipltool.errors import CheckpointError, UsageError, first_line

if TYPE_CHECKING:
    import torch

#: Data a zip-format file may declare beyond its own size before it counts as a zip bomb:
#: twice the file size plus this slack (honest `torch.save` files declare less than their size).
ZIP_SLACK = 16 << 20
#: The same allowance for the bytes the loaded tensors declare (views may share a storage).
TENSOR_SLACK = 16 << 20

#: Generator config fields: (type, smallest, largest). Released models: rosinality's
#: stylegan2-pytorch and NVlabs' stylegan2-ada-pytorch use style_dim (z_dim = w_dim) 512,
#: n_mlp 8 (2 in the ADA CIFAR config), channel_multiplier 2 (config-f) or 1 (config-e),
#: channel_max 512 (ADA's `channel_max`), lr_mlp 0.01; sizes 256..1024. `GeneratorConfig`
#: supports powers of two 32..1024 and channel multipliers 1 and 2; the tiny test models use
#: style_dim 16..64 and channel_max 16..32. The upper bounds leave twice the released values.
GENERATOR_LIMITS: dict[str, tuple[type, float, float]] = {
    "size": (int, 32, 1024),
    "style_dim": (int, 1, 1024),
    "n_mlp": (int, 1, 16),
    "channel_multiplier": (int, 1, 2),
    "channel_max": (int, 1, 1024),
    "lr_mlp": (float, 1e-6, 1.0),
}

#: Mapper constructor arguments every mapper takes: (smallest, largest). n_ctx counts the
#: BPE tokens of ctx_init, which must fit CLIP's context (77 tokens for OpenAI's models,
#: at most 256 in open_clip's configs); dim is CLIP's text width (512 for ViT-B, 768 for
#: ViT-L, 1280 for ViT-bigG; 4096 leaves room); latent_dim is the generator's style_dim.
MAPPER_LIMITS: dict[str, tuple[int, int]] = {
    "n_ctx": (1, 256),
    "dim": (1, 4096),
    "latent_dim": (1, int(GENERATOR_LIMITS["style_dim"][2])),
}

_UNSAFE_HINT = (
    "ipltool reads weights only (tensors, dicts, numbers); do not open this file with pickle "
    "or torch.load(weights_only=False) unless you trust its source"
)


# ----------------------------------------------------------------------------
# Reading


def human_bytes(n: float) -> str:
    """Bytes as '2.7 GB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # pragma: no cover


def check_file(path: str | os.PathLike, what: str = "checkpoint", hint: str | None = None) -> int:
    """Refuse what cannot be a weights file, before opening it; returns its size in bytes.

    Refused: a missing path, a folder, anything but a regular file (a FIFO or device would
    block or never end), an empty file, and a zip archive whose directory declares far
    more data than the file holds (see `check_zip`).

    Args:
        path: the file.
        what: what it should hold, for messages ("generator checkpoint", "weights file").
        hint: replaces the default hint of every refusal (optional).

    Raises:
        CheckpointError: one line naming the file.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{what} not found: {path}", hint=hint) from None
    except OSError as err:
        raise CheckpointError(f"cannot read {what} {path}: {first_line(err)}", hint=hint) from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{path} is a folder, not a file ({what} expected)", hint=hint)
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path} is not a regular file ({what} expected)", hint=hint)
    if info.st_size == 0:
        raise CheckpointError(
            f"{path} is empty (0 bytes), not a usable {what}",
            hint=hint or "the file was cut short or never written; copy or fetch it again",
        )
    if zipfile.is_zipfile(path):
        check_zip(path, info.st_size, what, hint)
    return info.st_size


def check_zip(path: str | os.PathLike, size: int, what: str = "checkpoint", hint: str | None = None) -> None:
    """Refuse a zip archive whose entries declare more than `2 * size + ZIP_SLACK` bytes.

    `torch.save` stores its entries uncompressed, so an honest file declares at most its
    own size; torch's reader nevertheless inflates compressed entries, which lets a 2 MB
    file expand to gigabytes. Only the zip directory is read here, nothing is inflated.

    Raises:
        CheckpointError: an unreadable zip directory, or declared sizes beyond the limit.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CheckpointError(f"cannot read {what} {path}: damaged zip archive ({first_line(err)})", hint=hint) from None
    declared = sum(max(info.file_size, 0) for info in infos)
    if declared > 2 * size + ZIP_SLACK:
        raise CheckpointError(
            f"{path} is refused: its zip directory declares {human_bytes(declared)} of data in a {human_bytes(size)} file (a zip bomb)",
            hint=hint or "torch.save never compresses; get the file again from its source",
        )


def read(
    path: str | os.PathLike,
    what: str = "checkpoint",
    *,
    mmap: bool = True,
    map_location: Any = "cpu",
    hint: str | None = None,
) -> dict:
    """Load a `torch.save` file that must hold a dict, without running code from it.

    Steps: 1. `check_file` (missing, empty, non-regular, zip bomb); 2. `torch.load` with
    `weights_only=True` (and `mmap=True` for zip-format files on the CPU); 3. the top level
    must be a dict; 4. the tensors it holds may declare at most `2 * file size +
    TENSOR_SLACK` bytes.

    Args:
        path: the file.
        what: what it should hold, for messages ("generator checkpoint", "resume state").
        mmap: map zip-format files instead of reading them (tensors are paged in on use).
        map_location: passed to `torch.load` (mmap is used on the CPU only).
        hint: replaces the default hint of every refusal (optional).

    Returns:
        The dict, tensors on `map_location`.

    Raises:
        CheckpointError: one line naming the file: unreadable, unsafe (it would build
            something other than weights), not a dict, or declaring absurd sizes.
    """
    import torch

    path = Path(path)
    size = check_file(path, what, hint)
    on_cpu = map_location is None or str(map_location) == "cpu"
    use_mmap = bool(mmap and on_cpu and zipfile.is_zipfile(path))
    try:
        with warnings.catch_warnings():
            # torch warns about a pickle protocol its weights-only reader may not know; a
            # file it cannot read is refused below in one line, so the warning adds only noise.
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"cannot read {what} {path}: refused, it is not a plain weights file ({first_line(err)})",
            hint=hint or _UNSAFE_HINT,
        ) from None
    except MemoryError:
        raise CheckpointError(f"cannot read {what} {path}: it does not fit in memory", hint=hint) from None
    except Exception as err:  # torch raises many types for damaged files: RuntimeError, EOFError, ValueError...
        raise CheckpointError(f"cannot read {what} {path}: {first_line(err)}", hint=hint) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a dict ({what} expected)", hint=hint)
    declared = sum(t.numel() * t.element_size() for _, t in iter_tensors(obj))
    if declared > 2 * size + TENSOR_SLACK:
        raise CheckpointError(
            f"{path} is refused: its tensors declare {human_bytes(declared)} in a {human_bytes(size)} file",
            hint=hint or "the file is crafted or damaged; get it again from its source",
        )
    return obj


def iter_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with its path (`g_ema.conv1.conv.weight`).

    Each container is visited once, so shared or self-referencing containers (which a
    pickle can build) cannot loop; a tensor held twice is yielded twice.
    """
    import torch

    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(prefix, tree)]
    while stack:
        name, obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            yield name, obj
        elif isinstance(obj, (dict, list, tuple)):
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            children = [(f"{name}.{key}" if name else str(key), value) for key, value in items]
            stack.extend(reversed(children))  # depth first, in the file's order


# ----------------------------------------------------------------------------
# Contents


def check_finite(tree: Any, where: str | os.PathLike, prefix: str = "") -> None:
    """Refuse NaN or infinite values in any floating tensor of `tree` (nested dicts/lists).

    Args:
        tree: a state dict, or any nesting of dicts, lists and tuples holding tensors.
        where: the file (or `file[entry]`) for the message.
        prefix: prepended to the key paths in the message.

    Raises:
        CheckpointError: naming the file and the first non-finite tensor.
    """
    import torch

    for name, tensor in iter_tensors(tree, prefix):
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.device.type != "meta" and tensor.numel():
            if not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"{where} holds non-finite weights (NaN or inf), first in {name}",
                    hint="the model diverged or the file is damaged; use an earlier checkpoint",
                )


def tensor_dict(obj: Any, where: str | os.PathLike, what: str = "state dict") -> dict[str, torch.Tensor]:
    """`obj` as a state dict: a dict of string keys and tensor values.

    Raises:
        CheckpointError: another type, a non-string key, or a value that is not a tensor.
    """
    import torch

    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: the {what} is a {type(obj).__name__}, not a dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{where}: the {what} has a key of type {type(key).__name__} ({key!r:.40}), not a name")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: {what} entry {key!r} is a {type(value).__name__}, not a tensor")
    return obj


def check_shapes(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, Any], where: str | os.PathLike, target: str
) -> None:
    """Keys and shapes of `state` against a template (a module's `state_dict()`, possibly on meta).

    Raises:
        CheckpointError: `{where} does not fit {target}: N missing (...); N unexpected (...); N wrong shape (...)`.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {label} (first: {', '.join(keys[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} wrong shape (first: {k} is {list(state[k].shape)}, expected {list(expected[k].shape)})")
        raise CheckpointError(f"{where} does not fit {target}: {'; '.join(parts)}")


def load_strict(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str | os.PathLike, target: str,
    hint: str | None = None, assign: bool = False,
) -> None:
    """`module.load_state_dict(state, strict=True)`, refused first with one line naming the mismatching keys.

    Args:
        where, target: the message reads `{where} does not fit {target}: ...` (see `check_shapes`).
        hint: the error's hint.
        assign: keep the given tensors as the parameters (a module built on the meta device).

    Raises:
        CheckpointError: missing, unexpected or wrongly shaped keys, or anything else
            `load_state_dict` refuses.
    """
    try:
        check_shapes(state, module.state_dict(), where, target)
    except CheckpointError as err:
        raise CheckpointError(err.message, hint=hint) from None
    try:
        module.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as err:
        raise CheckpointError(f"{where} does not fit {target}: {first_line(err)}", hint=hint) from None


def check_number(where: str, key: str, value: Any, kind: type, low: float, high: float, power_of_two: bool = False) -> None:
    """Refuse a config value of the wrong type (bool, NaN, a string) or outside `low..high`.

    Raises:
        CheckpointError: `{where}: {key} ...`, saying which rule the value breaks.
    """
    if kind is int:
        ok_type = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok_type:
        raise CheckpointError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, not {value!r:.60}")
    if not low <= value <= high:
        raise CheckpointError(f"{where}: {key} = {value} is outside the range real models use ({low:g}..{high:g})")
    if power_of_two and value & (value - 1):
        raise CheckpointError(f"{where}: {key} = {value} is not a power of two")


def mapper_args(init_args: Any, where: str | os.PathLike) -> tuple[int, int, int, dict]:
    """A mapper checkpoint's constructor arguments, checked before the mapper is built.

    `n_ctx`, `dim` and `latent_dim` must be integers within `MAPPER_LIMITS`; the options
    (the rest) must be plain values (bool, int, float, str, None) with string names.

    Returns:
        `(n_ctx, dim, latent_dim, options)`.

    Raises:
        CheckpointError: one line naming the file and the argument.
    """
    if not isinstance(init_args, dict):
        raise CheckpointError(f"{where}: init_args is a {type(init_args).__name__}, not a table of arguments")
    args = dict(init_args)
    sizes = []
    for key, (low, high) in MAPPER_LIMITS.items():
        if key not in args:
            raise CheckpointError(f"{where}: init_args has no {key}")
        check_number(str(where), f"init_args {key}", args[key], int, low, high)
        sizes.append(args.pop(key))
    for key, value in args.items():
        if not isinstance(key, str) or not key.isidentifier():
            raise CheckpointError(f"{where}: init_args has an option named {key!r:.40}, not a name")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise CheckpointError(f"{where}: init_args option {key} is a {type(value).__name__}, not a plain value")
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{where}: init_args option {key} = {value} is not finite")
    return sizes[0], sizes[1], sizes[2], args


def meta_state(build: Callable[[], Any]) -> dict[str, torch.Tensor] | None:
    """The state dict of the module `build()` makes, built on the meta device (no memory).

    Returns:
        Key -> meta tensor (shapes and dtypes only), or None when the module cannot be
        built on the meta device (a plugin doing real arithmetic in its constructor).
    """
    import torch

    try:
        with torch.device("meta"):
            module = build()
        return dict(module.state_dict())
    except (CheckpointError, UsageError):
        raise
    except Exception:  # noqa: BLE001 - a plugin's constructor may not support meta tensors
        return None


# ----------------------------------------------------------------------------
# Resume states


def check_rng_state(rng: Any, where: str | os.PathLike) -> None:
    """Validate the `rng` entry of a resume state (`train.run.capture_rng_state`'s layout).

    `torch`: a uint8 tensor of this torch's CPU state size; `cuda`: a list of uint8
    tensors; `python`: `[version, 625 ints in 0..2**32-1, gauss]`; `numpy`: name, a
    624-entry integer key, position, has_gauss, cached_gaussian.

    Raises:
        CheckpointError: the first entry of the wrong type or size.
    """
    import torch

    def bad(entry: str, why: str) -> CheckpointError:
        return CheckpointError(f"{where}: rng {entry} {why}")

    if not isinstance(rng, dict):
        raise bad("state", f"is a {type(rng).__name__}, not a table")
    unknown = sorted(map(str, set(rng) - {"torch", "cuda", "python", "numpy"}))
    if unknown:
        raise bad("state", f"has unknown entries: {', '.join(unknown)}")
    if "torch" in rng:
        state = rng["torch"]
        size = torch.get_rng_state().numel()
        if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or tuple(state.shape) != (size,):
            raise bad("torch", f"must be a uint8 tensor of {size} bytes")
    if "cuda" in rng:
        states = rng["cuda"]
        if not isinstance(states, list) or not all(
            isinstance(s, torch.Tensor) and s.dtype == torch.uint8 and s.ndim == 1 for s in states
        ):
            raise bad("cuda", "must be a list of uint8 tensors")
    if "python" in rng:
        state = rng["python"]
        ok = isinstance(state, (list, tuple)) and len(state) == 3
        if ok:
            version, internal, gauss = state
            ok = (
                isinstance(version, int)
                and isinstance(internal, (list, tuple))
                and len(internal) == 625
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32 for x in internal)
                and internal[-1] <= 624
                and (gauss is None or isinstance(gauss, float))
            )
        if not ok:
            raise bad("python", "must be [version, 625 integers (the last at most 624), gauss or None]")
    if "numpy" in rng:
        state = rng["numpy"]
        ok = isinstance(state, dict) and set(state) == {"name", "key", "pos", "has_gauss", "cached_gaussian"}
        if ok:
            key = state["key"]
            ok = (
                isinstance(state["name"], str)
                and isinstance(key, torch.Tensor)
                and not key.is_floating_point()
                and tuple(key.shape) == (624,)
                and isinstance(state["pos"], int)
                and 0 <= state["pos"] <= 624
                and state["has_gauss"] in (0, 1)
                and isinstance(state["cached_gaussian"], (int, float))
            )
        if not ok:
            raise bad("numpy", "must be {name, key (624 integers), pos (0..624), has_gauss, cached_gaussian}")


def _check_optimizer_state(saved: Any, optimizer, where: str, key: str, finite: bool = True) -> None:
    import torch

    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(saved.get("param_groups"), list):
        raise CheckpointError(f"{where}: {key} is not an optimizer state (it needs 'state' and 'param_groups')")
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{where}: {key} has {len(groups)} parameter group(s), the optimizer has {len(optimizer.param_groups)}")
    shapes: dict[int, tuple[int, ...]] = {}
    for index, (group, live) in enumerate(zip(groups, optimizer.param_groups)):
        ids = group.get("params") if isinstance(group, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise CheckpointError(f"{where}: {key} parameter group {index} has no list of parameter ids")
        if len(ids) != len(live["params"]):
            raise CheckpointError(f"{where}: {key} parameter group {index} has {len(ids)} parameters, the optimizer {len(live['params'])}")
        for name, value in group.items():
            if name != "params" and isinstance(value, float) and not math.isfinite(value):
                raise CheckpointError(f"{where}: {key} parameter group {index} has {name} = {value}")
        shapes.update({i: tuple(p.shape) for i, p in zip(ids, live["params"])})
    for param_id, values in saved["state"].items():
        if param_id not in shapes:
            raise CheckpointError(f"{where}: {key} holds state for parameter {param_id!r:.40}, which no group lists")
        if not isinstance(values, dict):
            raise CheckpointError(f"{where}: {key} state of parameter {param_id} is a {type(values).__name__}, not a table")
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.numel() > 1 and tuple(value.shape) != shapes[param_id]:
                    raise CheckpointError(
                        f"{where}: {key} {name} of parameter {param_id} has shape {list(value.shape)}, "
                        f"the parameter {list(shapes[param_id])}"
                    )
            elif not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CheckpointError(f"{where}: {key} {name} of parameter {param_id} is a {type(value).__name__}")
    if finite:
        check_finite(saved["state"], where, prefix=f"{key}.state")


def _check_scaler_state(saved: Any, scaler, where: str, key: str) -> None:
    template = scaler.state_dict()
    if not isinstance(saved, dict) or set(saved) - set(template):
        raise CheckpointError(f"{where}: {key} is not a loss scaler state (expected the keys {', '.join(template)})")
    for name, value in saved.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise CheckpointError(f"{where}: {key} {name} must be a finite number, not {value!r:.40}")
    if "scale" in saved and saved["scale"] <= 0:
        raise CheckpointError(f"{where}: {key} scale must be positive, not {saved['scale']}")


def validate_state(
    state: Any,
    path: str | os.PathLike,
    *,
    stage: str | None = None,
    modules: Mapping[str, Any] | None = None,
    optimizers: Mapping[str, Any] | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
    scalers: Mapping[str, Any] | None = None,
    max_step: int | None = None,
    rng: bool = True,
    finite: bool = True,
) -> dict:
    """Check a resume state (`state.pt`) against the run that is about to use it.

    Nothing of it is used before every check passes, so a foreign, planted or damaged
    file is refused with one line instead of failing (or running extra steps) later.
    Entries not named here are ignored.

    Args:
        state: what `RunDir.load_state` returned.
        path: the file, for messages.
        stage: the required value of `state["stage"]` (None: not checked).
        modules: entry -> module whose `state_dict()` the entry must match (keys, shapes;
            every floating tensor finite).
        optimizers: entry -> optimizer whose parameters the entry's state must fit
            (group and parameter counts, per-parameter tensor shapes, finite values).
        tensors: entry -> template tensor: same shape, both floating or both not; finite.
        scalers: name -> `torch.amp.GradScaler`; `state["scalers"][name]` is optional and,
            when present, must be a scaler state of finite numbers (positive scale).
        max_step: largest allowed `step` (None: no upper bound here).
        rng: require and check the `rng` entry (`check_rng_state`).
        finite: refuse NaN or inf in the modules', optimizers' and tensors' entries (off
            when the caller checks the restored weights itself, as stage 2's step guard does).

    Returns:
        `state`, unchanged.

    Raises:
        CheckpointError: one line naming the file and the first problem; the hint says
            the file is damaged or foreign and how to start over.
    """
    import torch

    hint = "the file is damaged or was not written by ipltool for this run; delete it to start over"
    where = str(path)
    try:
        if not isinstance(state, dict):
            raise CheckpointError(f"{where}: a resume state is a dict, not a {type(state).__name__}")
        required = ["step", *(["stage"] if stage is not None else []), *(modules or {}), *(optimizers or {}), *(tensors or {})]
        missing = [key for key in [*required, *(["rng"] if rng else [])] if key not in state]
        if missing:
            raise CheckpointError(f"{where}: not a resume state of this run (missing: {', '.join(missing)})")
        if stage is not None and state["stage"] != stage:
            raise CheckpointError(f"{where}: holds a {state['stage']!r:.40} state, not {stage!r}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise CheckpointError(f"{where}: step is a {type(step).__name__}, not an integer")
        if step < 0 or (max_step is not None and step > max_step):
            bound = f"0..{max_step}" if max_step is not None else "0 or more"
            raise CheckpointError(f"{where}: step {step} is out of range ({bound})")
        for key, module in (modules or {}).items():
            saved = tensor_dict(state[key], where, f"{key} state dict")
            check_shapes(saved, module.state_dict(), f"{where} ({key})", f"the {type(module).__name__} of this run")
            if finite:
                check_finite(saved, where, prefix=key)
        for key, optimizer in (optimizers or {}).items():
            _check_optimizer_state(state[key], optimizer, where, key, finite)
        for key, template in (tensors or {}).items():
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{where}: {key} is a {type(value).__name__}, not a tensor")
            if tuple(value.shape) != tuple(template.shape) or value.is_floating_point() != template.is_floating_point():
                raise CheckpointError(
                    f"{where}: {key} is a {list(value.shape)} {value.dtype} tensor, expected {list(template.shape)} {template.dtype}"
                )
            if finite:
                check_finite(value, where, prefix=key)
        if scalers and "scalers" in state:
            saved_scalers = state["scalers"]
            if not isinstance(saved_scalers, dict) or set(saved_scalers) - set(scalers):
                raise CheckpointError(f"{where}: scalers must be a table of {', '.join(scalers)}")
            for key, saved in saved_scalers.items():
                _check_scaler_state(saved, scalers[key], where, f"scalers.{key}")
        if rng:
            check_rng_state(state["rng"], where)
    except CheckpointError as err:
        raise CheckpointError(err.message, hint=err.hint or hint) from None
    return state


def state_stage(state: Any, path: str | os.PathLike, known: tuple[str, ...] = ("mapper", "adapt")) -> str:
    """The `stage` a resume state belongs to; a state without one of `known` is foreign.

    Raises:
        CheckpointError: not a dict, or no (or an unknown) `stage` entry.
    """
    stage = state.get("stage") if isinstance(state, dict) else None
    if not isinstance(stage, str) or stage not in known:
        raise CheckpointError(
            f"{path}: not an ipltool resume state (stage {stage!r:.40}; expected one of {', '.join(known)})",
            hint="the file is damaged or was not written by ipltool; delete it to start over",
        )
    return stage


# ----------------------------------------------------------------------------
# Caches


def read_feature_cache(path: str | os.PathLike) -> dict | None:
    """An `ipl eval` feature cache, or None when it cannot be trusted (then it is recomputed).

    A cache is `{"n": rows, "features": {name: tensor with at least n rows}}`, written by
    `ipl eval` itself; anything else (damaged, planted, an unsafe pickle) gives None.
    """
    import torch

    try:
        cached = read(path, "feature cache", mmap=False)
    except CheckpointError:
        return None
    n, features = cached.get("n"), cached.get("features")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or not isinstance(features, dict):
        return None
    if n and not features:
        return None
    for name, rows in features.items():
        if not isinstance(name, str) or not isinstance(rows, torch.Tensor) or rows.ndim < 1 or rows.shape[0] < n:
            return None
    return {"n": n, "features": dict(features)}
