"""Import NVlabs StyleGAN2-ADA-PyTorch network pickles without running their code.

An NVlabs pickle (`network-snapshot-*.pkl`, the released `ffhq.pkl`, ...) is a dict
with `G`, `D`, `G_ema` and maybe `training_set_kwargs` and `augment_pipe`. Every
network in it goes through `torch_utils.persistence`, which stores the *source code*
of the network's module and `exec()`s it when the file is unpickled. This module never
takes that path: a restricted unpickler resolves only the globals such a file needs,
each to a harmless function of ours, and rebuilds every network as a `PersistentObject`
(class name plus state: parameters, buffers, submodules, plain attributes). The
stored source is dropped unread.

`convert_g_ema` then maps the stand-in `G_ema` to the rosinality state-dict layout of
`ipltool.models.stylegan2.Generator`; `import_nvlabs_generator` writes the result as a
checkpoint, and `import_pickle` puts it into the cache under a registry name
(`ipl fetch --import NAME FILE.pkl`):

| NVlabs (`G_ema`)                          | ipltool / rosinality                          |
|-------------------------------------------|-----------------------------------------------|
| `mapping.fc{i}.weight`, `.bias`           | `style.{i+1}.weight`, `.bias` (as stored)     |
| `mapping.w_avg` (D,)                      | checkpoint entry `latent_avg` (D,)            |
| `synthesis.b4.const` (C, 4, 4)            | `input.input` (1, C, 4, 4)                    |
| `synthesis.b4.conv1`                      | `conv1`, noise `noises.noise_0`               |
| `synthesis.b4.torgb`                      | `to_rgb1`                                     |
| `synthesis.b{R}.conv0` / `.conv1` (k=1..) | `convs.{2k-2}` / `convs.{2k-1}`, `noise_{2k-1}` / `noise_{2k}` |
| `synthesis.b{R}.torgb`                    | `to_rgbs.{k-1}`                               |
| layer `.weight` (O, I, kh, kw)            | `.conv.weight` (1, O, I, kh, kw)              |
| layer `.affine.weight`, `.affine.bias`    | `.conv.modulation.weight`, `.bias`            |
| conv layer `.bias` (O,)                   | `.activate.bias` (O,)                         |
| torgb `.bias` (3,)                        | `.bias` (1, 3, 1, 1)                          |
| `.noise_strength` ()                      | `.noise.weight` (1,)                          |
| `.noise_const` (R, R)                     | `noises.noise_{j}` (1, 1, R, R)               |
| `resample_filter` (4, 4), sums to 1       | `convs.{2k-2}.conv.blur.kernel`, `to_rgbs.{k-1}.upsample.kernel` = 4 x filter |

No value is rescaled: both code bases store raw weights and apply the equalized
learning-rate gains at run time (`lr / sqrt(fan_in)` on weights, `lr` on biases), both
store the modulation bias with its init of 1 included, and both run the upsampling
convolution as a transposed convolution of the same, unflipped weight.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

from ipltool import hub
from ipltool.errors import CheckpointError, UsageError, first_line
from ipltool.models.stylegan2 import BLUR_KERNEL, GeneratorConfig, build_from_state, generator_checkpoint, make_kernel
from ipltool.atomic import atomic_torch_save
from ipltool.download import sha256_file

class UnsafePickleError(CheckpointError):
    """A pickle that asks for a global outside the allow-list (it could run code)."""


# ----------------------------------------------------------------------------
# Stand-ins for what the pickle refers to


class _Sealed(type):
    """Metaclass of the classes handed to the unpickler: their attributes cannot be replaced.

    A pickle's BUILD opcode can set attributes on any object it holds, classes included;
    sealing them keeps a crafted file from patching methods that later code calls.
    """

    def __setattr__(cls, name, value):
        raise UnsafePickleError(f"the pickle tried to modify class {cls.__name__}")

    def __delattr__(cls, name):
        raise UnsafePickleError(f"the pickle tried to modify class {cls.__name__}")


class PersistentObject(metaclass=_Sealed):
    """What an NVlabs persistent network object becomes here: a name and its state, no code.

    Attributes:
        class_name: the NVlabs class (`Generator`, `SynthesisLayer`, ...).
        state: the object's `__dict__` as pickled: `_parameters`, `_buffers` and `_modules`
            (dicts of tensors and of further `PersistentObject`s) plus plain attributes
            (`z_dim`, `w_dim`, `img_resolution`, `num_ws`, `weight_gain`, ...).

    Attribute access falls through to `state` and then, as on a `torch.nn.Module`, to its
    parameters, buffers and submodules: `g.z_dim`, `g.mapping.fc0.weight`.
    """

    __slots__ = ("class_name", "state")

    def __init__(self, class_name: str, state: dict):
        object.__setattr__(self, "class_name", class_name)
        object.__setattr__(self, "state", state)

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"the pickle tried to modify a {self.class_name} object after building it")

    def __getattr__(self, name: str) -> Any:
        if name in PersistentObject.__slots__:
            raise AttributeError(name)
        state = self.state
        if name in state:
            return state[name]
        for group in ("_parameters", "_buffers", "_modules"):
            items = state.get(group)
            if isinstance(items, dict) and name in items:
                return items[name]
        raise AttributeError(f"NVlabs {self.class_name} has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"<NVlabs {self.class_name} stand-in>"


class _EasyDict(dict, metaclass=_Sealed):
    """Stand-in for `dnnlib.util.EasyDict`: a dict whose keys read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _NumpyDtype(metaclass=_Sealed):
    """Stand-in for `numpy.dtype`: keeps the type code (`'f8'`) and the byte order."""

    def __init__(self, name: Any = "", align: Any = False, copy: Any = True):
        if not isinstance(name, str):
            raise CheckpointError(f"numpy dtype record with a {type(name).__name__} name")
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


class _NumpyArray(metaclass=_Sealed):
    """Stand-in for a pickled `numpy.ndarray`: shape, dtype and raw data, never decoded."""

    def __init__(self):
        self.shape, self.dtype, self.data = (), None, b""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise CheckpointError("malformed numpy array record")
        _, self.shape, self.dtype, _, self.data = state


class _NumpyValue(metaclass=_Sealed):
    """A numpy scalar of a kind this module does not decode (kept as raw bytes)."""

    def __init__(self, dtype: _NumpyDtype, data: bytes):
        self.dtype, self.data = dtype, data


class _SafeCall:
    """A callable the unpickler may use: one of our functions, under the name the pickle asked for."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __setattr__(self, name, value):
        raise UnsafePickleError(f"the pickle tried to modify {self._name}")

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<safe stand-in for {self._name}>"


_NDARRAY = _NumpyArray  # what `numpy.ndarray` resolves to (only used as a marker)


def _reconstruct_persistent(meta: Any) -> PersistentObject:
    """Stand-in for `torch_utils.persistence._reconstruct_persistent_obj`.

    The NVlabs original exec()s `meta["module_src"]` and instantiates the class from it.
    Here the source is ignored and the state is kept as data.
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"persistent object record is a {type(meta).__name__}, not a dict")
    class_name, state = meta.get("class_name"), meta.get("state")
    if meta.get("type") != "class" or not isinstance(class_name, str):
        raise CheckpointError("persistent object record without a class name")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise CheckpointError(f"persistent {class_name} has a {type(state).__name__} state, not a dict")
    return PersistentObject(class_name, dict(state))


def _check_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"tensor record with a bad {what}: {value!r}")
    return value


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for `torch._utils._rebuild_tensor_v2`: a view of `storage`, bounds checked.

    `requires_grad`, the backward hooks and the metadata are ignored.
    """
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"tensor record whose storage is a {type(storage).__name__}")
    offset = _check_int(storage_offset, "storage offset")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise CheckpointError("tensor record with malformed size or stride")
    size = tuple(_check_int(s, "size") for s in size)
    stride = tuple(_check_int(s, "stride") for s in stride)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation notices
        numel = storage.size()
        if all(size):
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= numel:
                raise CheckpointError(f"tensor record reaches element {last} of a storage of {numel}")
        return torch.empty(0, dtype=storage.dtype).set_(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Stand-in for `torch._utils._rebuild_parameter` (and `..._with_state`): the plain tensor."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter record holding a {type(data).__name__}")
    return data


def _load_storage(data: Any) -> torch.storage.TypedStorage:
    """Stand-in for `torch.storage._load_from_bytes`: the same bytes through `torch.load(weights_only=True)`.

    Each storage is a small legacy-format `torch.save` archive (its own pickle plus raw
    data); torch's weights-only unpickler reads it, so no global outside torch's own
    tensor allow-list is resolved there either.
    """
    if not isinstance(data, (bytes, bytearray)):
        raise CheckpointError(f"storage record holding a {type(data).__name__}, not bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation notices
            storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused:
            raise UnsafePickleError(
                f"an embedded tensor record refers to {refused.group(1)}, which a tensor never needs",
                hint=_UNSAFE_HINT,
            ) from None
        raise CheckpointError(f"corrupt tensor record: {first_line(err)}") from None
    except Exception as err:  # torch raises many types for damaged archives
        raise CheckpointError(f"corrupt tensor record: {first_line(err)}") from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise CheckpointError(f"storage record decoded to a {type(storage).__name__}")
    return storage


_STRUCT_CODES = {"f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
                 "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}  # fmt: skip


def _numpy_scalar(dtype: Any, data: Any = None):
    """Stand-in for `numpy.core.multiarray.scalar`: a Python number for numeric dtypes."""
    if not isinstance(dtype, _NumpyDtype) or not isinstance(data, (bytes, bytearray)):
        raise CheckpointError("malformed numpy scalar record")
    code = _STRUCT_CODES.get(dtype.name)
    if code is None or struct.calcsize(code) != len(data):
        return _NumpyValue(dtype, bytes(data))
    return struct.unpack((">" if dtype.byteorder == ">" else "<") + code, data)[0]


def _numpy_reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> _NumpyArray:
    """Stand-in for `numpy.core.multiarray._reconstruct`: an empty `_NumpyArray` that BUILD fills."""
    if cls is not _NDARRAY:
        raise CheckpointError("numpy array record of an unexpected class")
    return _NumpyArray()


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
    """Stand-in for `_codecs.encode`, which protocol-2 pickles use to spell bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("malformed bytes record")
    return text.encode("latin1")


def _safe(fn, name: str):
    return lambda: _SafeCall(fn, name)


def _plain(obj):
    return lambda: obj


#: (module, name) -> factory of what the unpickler gets. Everything else is refused.
_ALLOWED_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _safe(_reconstruct_persistent, "_reconstruct_persistent_obj"),
    ("torch._utils", "_rebuild_tensor_v2"): _safe(_rebuild_tensor, "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"): _safe(_rebuild_parameter, "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"): _safe(_rebuild_parameter, "_rebuild_parameter_with_state"),
    ("torch.storage", "_load_from_bytes"): _safe(_load_storage, "_load_from_bytes"),
    ("collections", "OrderedDict"): _plain(collections.OrderedDict),
    ("builtins", "set"): _plain(set),
    ("builtins", "frozenset"): _plain(frozenset),
    ("builtins", "slice"): _plain(slice),
    ("dnnlib.util", "EasyDict"): _plain(_EasyDict),
    ("dnnlib", "EasyDict"): _plain(_EasyDict),
    ("numpy", "dtype"): _plain(_NumpyDtype),
    ("numpy", "ndarray"): _plain(_NDARRAY),
    ("numpy.core.multiarray", "scalar"): _safe(_numpy_scalar, "scalar"),
    ("numpy._core.multiarray", "scalar"): _safe(_numpy_scalar, "scalar"),
    ("numpy.core.multiarray", "_reconstruct"): _safe(_numpy_reconstruct, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _safe(_numpy_reconstruct, "_reconstruct"),
    ("_codecs", "encode"): _safe(_latin1_encode, "encode"),
}

#: Python 2 module names that protocol-2 pickles still write.
_PY2_MODULES = {"__builtin__": "builtins"}

_UNSAFE_HINT = (
    "only StyleGAN2-ADA-PyTorch network pickles are accepted; this file may be corrupt or crafted, "
    "so do not open it with pickle.load either"
)


class _NVlabsUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` that resolves only `_ALLOWED_GLOBALS`, each to our stand-in."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)  # what pickle's own find_class does for protocol < 3
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is not None:
            return factory()
        if module.startswith("dnnlib.tflib"):
            raise CheckpointError(
                f"{self.source} is a TensorFlow-era StyleGAN2 pickle ({module}.{name}), not a PyTorch one",
                hint="convert it with legacy.py from NVlabs/stylegan2-ada-pytorch first, then import the result",
            )
        raise UnsafePickleError(
            f"{self.source} refers to {module}.{name}, which is not allowed in a network pickle; refused",
            hint=_UNSAFE_HINT,
        )

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source} uses persistent ids, which NVlabs network pickles do not")


# ----------------------------------------------------------------------------
# Loading


def load_nvlabs_pickle(path: str | Path) -> dict:
    """Read an NVlabs network pickle with a restricted unpickler; no code from it runs.

    Args:
        path: a `.pkl` written by StyleGAN2-ADA-PyTorch (or the StyleGAN3 code base's
            StyleGAN2): a dict with `G`, `D`, `G_ema` and maybe `training_set_kwargs`,
            `augment_pipe`.

    Returns:
        The dict, with every network as a `PersistentObject` (tensors are real CPU tensors).

    Raises:
        UnsafePickleError: the file asks for a global outside the allow-list.
        CheckpointError: missing, truncated or corrupt file, or not such a dict.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = _NVlabsUnpickler(f, source=str(path)).load()
    except FileNotFoundError:
        raise CheckpointError(f"NVlabs pickle not found: {path}") from None
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(f"cannot read NVlabs pickle {path}: nested too deeply") from None
    except Exception as err:  # pickle raises many types for damaged input
        raise CheckpointError(f"cannot read NVlabs pickle {path}: {first_line(err)}") from None
    if isinstance(data, tuple):
        raise CheckpointError(
            f"{path} holds a tuple, as TensorFlow-era StyleGAN2 pickles do, not a dict of networks",
            hint="convert it with legacy.py from NVlabs/stylegan2-ada-pytorch first",
        )
    if not isinstance(data, dict) or not isinstance(data.get("G_ema"), PersistentObject):
        found = ", ".join(sorted(map(str, data))) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(f"{path} is not an NVlabs network pickle: no G_ema network (found: {found})")
    return data


# ----------------------------------------------------------------------------
# Conversion


def _named_tensors(obj: PersistentObject, prefix: str = "") -> dict[str, torch.Tensor]:
    """Parameters and buffers of a stand-in network, named as its `state_dict()` would."""
    out: dict[str, torch.Tensor] = {}
    for group in ("_parameters", "_buffers"):
        items = obj.state.get(group) or {}
        if not isinstance(items, dict):
            raise CheckpointError(f"{prefix or 'network '}{group} is a {type(items).__name__}, not a dict")
        for name, value in items.items():
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[f"{prefix}{name}"] = value
    children = obj.state.get("_modules") or {}
    if not isinstance(children, dict):
        raise CheckpointError(f"{prefix or 'network '}_modules is a {type(children).__name__}, not a dict")
    for name, child in children.items():
        if child is None:
            continue
        if not isinstance(child, PersistentObject):
            raise CheckpointError(f"{prefix}{name} is a {type(child).__name__}, not an NVlabs layer")
        out.update(_named_tensors(child, f"{prefix}{name}."))
    return out


def _child(obj: PersistentObject, dotted: str) -> PersistentObject | None:
    """The submodule at `dotted` (e.g. `"mapping.fc0"`), or None."""
    for name in dotted.split("."):
        modules = obj.state.get("_modules")
        obj = modules.get(name) if isinstance(modules, dict) else None
        if not isinstance(obj, PersistentObject):
            return None
    return obj


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _match_channel_layout(size: int, observed: dict[int, int]) -> tuple[int, int]:
    """Find the rosinality `(channel_multiplier, channel_max)` that gives `observed` channels.

    Args:
        size: output resolution.
        observed: channels per resolution, 4..size.

    Returns:
        `(channel_multiplier, channel_max)`; 2 when both multipliers fit (small or capped models).

    Raises:
        CheckpointError: no multiplier fits (NVlabs `channel_base` other than 16384 or 32768 with a cap).
    """
    channel_max = max(observed.values())
    for multiplier in (2, 1):
        table = GeneratorConfig(size, channel_multiplier=multiplier, channel_max=channel_max).channels()
        if all(table[res] == ch for res, ch in observed.items()):
            return multiplier, channel_max
    layout = ", ".join(f"{res}: {ch}" for res, ch in sorted(observed.items()))
    raise CheckpointError(
        f"channel layout {{{layout}}} has no rosinality equivalent (channel multiplier 1 or 2 with a cap)",
        hint="ipltool's generator supports NVlabs channel_base 16384 or 32768; other layouts cannot be imported",
    )


def _infer_config(g_ema: PersistentObject, nv: dict[str, torch.Tensor]) -> GeneratorConfig:
    """The `GeneratorConfig` of a stand-in `G_ema`, or CheckpointError if it has no equivalent."""
    if "synthesis.b4.const" not in nv:
        raise CheckpointError(
            f"G_ema ({g_ema.class_name}) is not a StyleGAN2 generator: no synthesis.b4.const",
            hint="only StyleGAN2 generators (stylegan2-ada-pytorch, or StyleGAN3's stylegan2 config) can be imported",
        )
    c_dim = _number(g_ema.state.get("c_dim")) or 0
    if c_dim or any(k.startswith("mapping.embed.") for k in nv):
        raise CheckpointError(f"G_ema is a conditional generator (c_dim={int(c_dim)}); ipltool's generator takes no class label")
    img_channels = _number(g_ema.state.get("img_channels"))
    if img_channels not in (None, 3.0):
        raise CheckpointError(f"G_ema makes {int(img_channels)}-channel images; ipltool's generator makes RGB")

    # Mapping network: n_mlp square layers of width style_dim, one lr multiplier.
    fc_indices = sorted(int(m.group(1)) for k in nv if (m := re.fullmatch(r"mapping\.fc(\d+)\.weight", k)))
    if not fc_indices or fc_indices != list(range(len(fc_indices))):
        raise CheckpointError(f"G_ema mapping layers are not fc0..fcN (found {fc_indices})")
    style_dim = nv["mapping.fc0.weight"].shape[1]
    shapes = {tuple(nv[f"mapping.fc{i}.weight"].shape) for i in fc_indices}
    if shapes != {(style_dim, style_dim)}:
        raise CheckpointError(
            f"G_ema mapping layers have shapes {sorted(shapes)}; ipltool's mapping network needs z_dim = w_dim = layer width"
        )
    gains = set()
    for i in fc_indices:
        fc = _child(g_ema, f"mapping.fc{i}")
        if fc is not None and fc.state.get("activation", "lrelu") != "lrelu":
            activation = fc.state.get("activation")
            raise CheckpointError(f"G_ema mapping.fc{i} uses {activation!r}; ipltool's mapping network uses lrelu")
        gain = _number(fc.state.get("bias_gain")) if fc is not None else None
        gains.add(0.01 if gain is None else gain)
    if len(gains) != 1:
        raise CheckpointError(f"G_ema mapping layers use different lr multipliers {sorted(gains)}")

    # Synthesis network: blocks 4..size, channels per block.
    resolutions = sorted({int(m.group(1)) for k in nv if (m := re.match(r"synthesis\.b(\d+)\.", k))})
    size = resolutions[-1]
    if resolutions != [2**i for i in range(2, int(math.log2(size)) + 1)]:
        raise CheckpointError(f"G_ema synthesis blocks {resolutions} are not 4, 8, ... up to a power of two")
    declared = _number(g_ema.state.get("img_resolution"))
    if declared is not None and int(declared) != size:
        raise CheckpointError(f"G_ema declares img_resolution {int(declared)} but has blocks up to {size}")
    for res in resolutions:
        block = _child(g_ema, f"synthesis.b{res}")
        architecture = block.state.get("architecture", "skip") if block is not None else "skip"
        if architecture != "skip":
            raise CheckpointError(f"G_ema uses the {architecture!r} architecture; ipltool's generator is 'skip'")
    observed = {4: nv["synthesis.b4.const"].shape[0]}
    for res in resolutions[1:]:
        key = f"synthesis.b{res}.conv0.weight"
        if key not in nv:
            raise CheckpointError(f"G_ema has no {key}")
        observed[res] = nv[key].shape[0]
    if size < 32 or size > 1024:
        raise CheckpointError(f"G_ema makes {size} px images; ipltool's generator supports 32 to 1024 px")
    multiplier, channel_max = _match_channel_layout(size, observed)
    try:
        return GeneratorConfig(size, style_dim, len(fc_indices), multiplier, channel_max, gains.pop())
    except UsageError as err:
        raise CheckpointError(f"G_ema has no ipltool equivalent: {err.message}") from None


def convert_g_ema(g_ema: PersistentObject) -> tuple[GeneratorConfig, dict[str, torch.Tensor]]:
    """Map a stand-in `G_ema` to our Generator's state dict (rosinality layout; table in the module docstring).

    Args:
        g_ema: the `G_ema` entry of `load_nvlabs_pickle`.

    Returns:
        `(config, state_dict)`: the `GeneratorConfig` and float32 tensors for every key of
        `Generator.from_config(config).state_dict()` (`load_state_dict(strict=True)` accepts it).

    Raises:
        CheckpointError: a generator our `Generator` cannot represent (conditional, other
            channel layout, mapping width, architecture, resample filter), or missing or
            unexpected tensors.
    """
    if not isinstance(g_ema, PersistentObject):
        raise CheckpointError(f"G_ema is a {type(g_ema).__name__}, not an NVlabs network")
    nv = _named_tensors(g_ema)
    config = _infer_config(g_ema, nv)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in nv:
            raise CheckpointError(f"G_ema has no {key}; not a stylegan2-ada-pytorch generator")
        used.add(key)
        return nv[key].detach().to(torch.float32).contiguous().clone()

    state: dict[str, torch.Tensor] = {}

    def modulated(ours: str, theirs: str) -> None:
        state[f"{ours}.conv.weight"] = take(f"{theirs}.weight").unsqueeze(0)
        state[f"{ours}.conv.modulation.weight"] = take(f"{theirs}.affine.weight")
        state[f"{ours}.conv.modulation.bias"] = take(f"{theirs}.affine.bias")

    def styled_conv(ours: str, theirs: str, noise_index: int, res: int) -> None:
        modulated(ours, theirs)
        state[f"{ours}.activate.bias"] = take(f"{theirs}.bias")
        if f"{theirs}.noise_strength" in nv:
            state[f"{ours}.noise.weight"] = take(f"{theirs}.noise_strength").reshape(1)
            state[f"noises.noise_{noise_index}"] = take(f"{theirs}.noise_const").reshape(1, 1, res, res)
        else:  # use_noise=False: no noise, which a zero strength reproduces
            state[f"{ours}.noise.weight"] = torch.zeros(1)
            state[f"noises.noise_{noise_index}"] = torch.zeros(1, 1, res, res)

    def to_rgb(ours: str, theirs: str) -> None:
        modulated(ours, theirs)
        state[f"{ours}.bias"] = take(f"{theirs}.bias").reshape(1, 3, 1, 1)

    # 1. Mapping network (PixelNorm is style.0 and has no weights).
    for i in range(config.n_mlp):
        state[f"style.{i + 1}.weight"] = take(f"mapping.fc{i}.weight")
        state[f"style.{i + 1}.bias"] = take(f"mapping.fc{i}.bias")
    if "mapping.w_avg" in nv:
        used.add("mapping.w_avg")

    # 2. Resample filters: all must be the [1, 3, 3, 1] filter our layers are built with.
    expected = make_kernel(BLUR_KERNEL)
    for key in [k for k in nv if k.endswith("resample_filter")]:
        f = take(key)
        if f.shape != expected.shape or not torch.allclose(f, expected, atol=1e-6):
            raise CheckpointError(f"G_ema {key} is not the [1, 3, 3, 1] filter ipltool's generator uses")

    # 3. The 4x4 block, then one level per resolution.
    state["input.input"] = take("synthesis.b4.const").unsqueeze(0)
    styled_conv("conv1", "synthesis.b4.conv1", 0, 4)
    to_rgb("to_rgb1", "synthesis.b4.torgb")
    for level in range(config.log_size - 2):
        res = 2 ** (level + 3)
        block = f"synthesis.b{res}"
        styled_conv(f"convs.{2 * level}", f"{block}.conv0", 2 * level + 1, res)
        styled_conv(f"convs.{2 * level + 1}", f"{block}.conv1", 2 * level + 2, res)
        to_rgb(f"to_rgbs.{level}", f"{block}.torgb")
        state[f"convs.{2 * level}.conv.blur.kernel"] = expected * 4
        state[f"to_rgbs.{level}.upsample.kernel"] = expected * 4

    leftover = sorted(set(nv) - used)
    if leftover:
        shown = ", ".join(leftover[:3]) + (", ..." if len(leftover) > 3 else "")
        raise CheckpointError(f"G_ema has {len(leftover)} tensors ipltool's generator has no place for ({shown})")
    return config, state


def import_nvlabs_generator(path: str | Path, out_path: str | Path) -> GeneratorConfig:
    """Convert the `G_ema` of an NVlabs pickle into an ipltool generator checkpoint.

    Steps:
        1. Read the pickle with `load_nvlabs_pickle` (no code from the file runs).
        2. Map `G_ema` to the rosinality layout with `convert_g_ema`.
        3. Load the result into a fresh `Generator` with `strict=True` and check it is finite.
        4. Write `generator_checkpoint(generator, latent_avg=mapping.w_avg)` atomically to `out_path`.

    Args:
        path: the NVlabs `.pkl`.
        out_path: the `.pt` to write (readable by `load_generator`, `torch.load(weights_only=True)`).

    Returns:
        The `GeneratorConfig` of the imported generator.

    Raises:
        UnsafePickleError, CheckpointError: see `load_nvlabs_pickle` and `convert_g_ema`.
    """
    g_ema = load_nvlabs_pickle(path)["G_ema"]
    config, state = convert_g_ema(g_ema)
    generator = build_from_state(config, state, f"converted G_ema of {path}")
    bad = [name for name, t in generator.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"G_ema of {path} holds non-finite values (first in {bad[0]})")
    extra = {}
    w_avg = _named_tensors(g_ema).get("mapping.w_avg")
    if w_avg is not None and tuple(w_avg.shape) == (config.style_dim,):
        extra["latent_avg"] = w_avg.detach().to(torch.float32).clone()
    atomic_torch_save(generator_checkpoint(generator, **extra), out_path)
    return config


def import_pickle(name: str, file: str | os.PathLike) -> Path:
    """Convert an NVlabs network pickle into the cache file of generator entry `name`, and record it.

    No code from the pickle runs (`import_nvlabs_generator`). The converted generator must
    have the entry's size and style width; its sha256 is recorded as coming from an
    NVlabs pickle (`hub.record`).

    Returns:
        The cache path of `name`.

    Raises:
        UsageError: `name` is synthetic or not a generator, the file does not exist, or it
            holds a generator of another size (nothing is left in the cache).
        UnsafePickleError, CheckpointError: see `import_nvlabs_generator`.
    """
    entry = hub.get_model(name)
    if entry.synthetic:
        raise UsageError(f"{name} is synthetic: it needs no file")
    source = Path(file).expanduser()
    if not source.is_file():
        raise UsageError(f"no such file: {source}")
    path = hub.local_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if entry.kind != "generator":
        raise UsageError(f"an NVlabs pickle holds a generator, and {name} is a {entry.kind}")
    config = import_nvlabs_generator(source, path)
    expected = GeneratorConfig.of_entry(entry)
    if (config.size, config.style_dim) != (expected.size, expected.style_dim):
        path.unlink(missing_ok=True)
        raise UsageError(f"{source} holds a {config.size} px generator; {name} is {expected.size} px")
    hub.record(name, sha256_file(path), path, "nvlabs-pickle")
    return path
