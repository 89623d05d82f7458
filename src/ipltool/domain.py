"""Domain files: what to adapt to, and with which settings.

A domain file is TOML validated by the pydantic models below; unknown keys are
errors. Defaults are the reference hyper-parameters of IPL (see docs/method.md), so a
domain file only needs `name`, `source`, `target` and `generator`.

Lookup of `--domain X` (first match wins):
1. X is a path to an existing file;
2. the user's domain dir (`$IPL_DOMAINS_DIR`, else `<user config dir>/ipltool/domains`);
3. the built-in domains shipped in the package;
4. domain packs of installed plugins (`ipltool.domains` entry points).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ipltool import tomlio
from ipltool.errors import DomainError, did_you_mean, unknown_name

# ----------------------------------------------------------------------------
# Schema


# Limits of values that would otherwise fail deep inside a run (RunDir names, torch's seeding, CLIP's tokenizer).
MAX_NAME_LENGTH = 100
#: A domain name: it names run directories (`runs/<name>-<timestamp>`), so no separators.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
#: torch.manual_seed takes 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1
#: CLIP reads 77 tokens, start and end tokens included.
CLIP_CONTEXT = 77
#: No BPE token of CLIP's vocabulary is longer than 32 characters, so a text of more than
#: 75 tokens x (32 + a space) characters surely overflows the context; longer texts are refused
#: here, torch-free and before any tokenizer sees them. The exact count is checked when the
#: models are built (`ipltool.train.setup.check_prompt_lengths`).
MAX_TEXT_CHARS = (CLIP_CONTEXT - 2) * 33
#: A domain file larger than this is refused before parsing (the built-in ones are a few kB).
MAX_FILE_CHARS = 1_000_000


def check_text_length(value: str) -> str:
    """Refuse a text that cannot fit CLIP's context, by its length alone (cheap for a 10 MB string)."""
    if len(value) > MAX_TEXT_CHARS:
        raise ValueError(
            f"too long ({len(value):,} characters): CLIP reads at most {CLIP_CONTEXT} tokens, and no text over {MAX_TEXT_CHARS:,} characters fits"
        )
    return value


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr = inf` or `lambda_l = nan` is refused here instead of training to NaN weights.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ClipModel(_Strict):
    """One CLIP model used by the losses.

    `model` is an open_clip architecture name (OpenAI spellings such as `ViT-B/32` are
    accepted), `pretrained` an open_clip tag or a path to a weights file, `weight` the
    factor of this model's directional loss in the sum.
    """

    model: str = Field("ViT-B/32", min_length=1)
    pretrained: str = "openai"
    weight: float = Field(1.0, gt=0)


class Prompts(_Strict):
    """Custom sentences describing the target (the thesis' custom-prompt loss)."""

    custom: list[str] = Field(default_factory=list)

    @field_validator("custom")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if any(not s.strip() for s in value):
            raise ValueError("custom prompts must not be empty strings")
        for index, sentence in enumerate(value):
            try:
                check_text_length(sentence)
            except ValueError as err:
                raise ValueError(f"custom prompt {index + 1} is {err}") from None
        return value


class Loss(_Strict):
    """Loss weights: stage 1 (`lambda_l`, `lambda_src`, `lambda_custom`) and stage 2."""

    lambda_l: float = Field(1.0, ge=0, description="domain regularization weight (stage 1)")
    lambda_src: float = Field(0.0, ge=0, description="source-side regularization, relative to lambda_l")
    lambda_custom: float = Field(0.2, ge=0, description="custom-prompt loss, relative to lambda_l; used only with [prompts]")
    lambda_direction: float = Field(1.0, ge=0, description="directional CLIP loss (stage 2)")
    lambda_global: float = Field(0.0, ge=0, description="global CLIP loss (NADA baseline only)")


class Mapper(_Strict):
    """Stage 1: the latent mapper and its training."""

    kind: str = "mlp"
    steps: int = Field(300, ge=1)
    batch: int = Field(32, ge=2)
    lr: float = Field(0.05, gt=0)
    seed: int = Field(3, ge=0, le=MAX_SEED)
    options: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments of the mapper")


class Adapt(_Strict):
    """Stage 2: generator adaptation."""

    method: Literal["ipl", "nada"] = "ipl"
    steps: int = Field(300, ge=1)
    batch: int = Field(2, ge=1)
    lr: float = Field(0.002, gt=0)
    ema: float = Field(0.99, ge=0, lt=1)
    auto_layer_k: int | None = Field(None, ge=1, description="layers trained per step; default int(2*n_latent/3)")
    auto_layer_iters: int = Field(1, ge=0, description="0 turns the adaptive layer choice off")
    auto_layer_batch: int = Field(8, ge=1)
    mixing: float = Field(0.0, ge=0, le=1, description="style-mixing probability")
    seed: int = Field(2, ge=0, le=MAX_SEED)
    sample_every: int = Field(100, ge=1)
    n_sample: int = Field(35, ge=1)
    sample_size: int = Field(256, ge=16, le=1024, description="edge of one sample in the sample grids, px (generator output is resized)")
    truncation: float = Field(0.7, gt=0, le=1)
    style_images: str | None = Field(
        None, description="NADA only: folder of style images whose CLIP direction replaces the text direction"
    )

    @model_validator(mode="after")
    def _style_images_need_nada(self) -> "Adapt":
        if self.style_images is not None and self.method != "nada":
            raise ValueError("style_images is a NADA option: set method = \"nada\" too")
        return self

    def layer_k(self, n_latent: int) -> int:
        """`auto_layer_k`, or the reference default (`default_layer_k`)."""
        return self.auto_layer_k if self.auto_layer_k is not None else self.default_layer_k(n_latent)

    @staticmethod
    def default_layer_k(n_latent: int) -> int:
        """The reference's layers per step: `int(2 * n_latent / 3)` (12 at 1024, 10 at 512)."""
        return int(2 * n_latent / 3)


class Domain(_Strict):
    """A complete domain description: labels, models and hyper-parameters."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    source: str = Field(min_length=1)
    target: str = Field(min_length=1)
    generator: str = Field(min_length=1, description="model registry name or path to a .pt checkpoint")
    clip: list[ClipModel] = Field(default_factory=lambda: [ClipModel()], min_length=1)
    ctx_init: str = Field("a photo of a", min_length=1)
    prompts: Prompts = Field(default_factory=Prompts)
    loss: Loss = Field(default_factory=Loss)
    mapper: Mapper = Field(default_factory=Mapper)
    adapt: Adapt = Field(default_factory=Adapt)

    @field_validator("generator")
    @classmethod
    def _known_generator(cls, value: str) -> str:
        if _is_generator_file(value):
            return value  # a file: checked when a command loads it
        from ipltool import hub

        known = [e.name for e in hub.list_models("generator")]
        if value not in known:
            raise ValueError(f"unknown generator {value!r}{did_you_mean(value, known)} (known: {', '.join(known)}; or a path to a .pt file)")
        return value

    @field_validator("source", "target", "ctx_init")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        check_text_length(value)  # first: a 10 MB string is not even stripped
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("name", mode="before")
    @classmethod
    def _short_name(cls, value: Any) -> Any:
        # Before the pattern, so that a long name is refused for its length, not quoted whole.
        if isinstance(value, str) and len(value) > MAX_NAME_LENGTH:
            raise ValueError(f"too long ({len(value):,} characters): a domain name has at most {MAX_NAME_LENGTH} (it names run directories)")
        return value

    def with_overrides(self, overrides: dict[str, Any], flags: dict[str, str] | None = None) -> "Domain":
        """Return a copy with dotted keys replaced (`{"adapt.steps": 10}`), validated again.

        Keys whose value is None are ignored, so unset command flags can be passed as they are.

        Args:
            overrides: dotted key -> new value.
            flags: dotted key -> the command flag that set it (`{"adapt.steps": "--steps"}`):
                a bad value of such a key is reported in the flag's words
                (`--steps must be ≥ 1 (got -5)`), any other as `override: key ...`.

        Raises:
            DomainError: an unknown key, or a value the schema refuses.
        """
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                if part not in node or not isinstance(node[part], dict):
                    raise DomainError(f"cannot override unknown key {dotted!r}")
                node = node[part]
            if leaf not in node:
                raise DomainError(f"cannot override unknown key {dotted!r}")
            node[leaf] = value
        try:
            return Domain.model_validate(data)
        except ValidationError as err:
            error = err.errors()[0]
            flag = (flags or {}).get(".".join(str(part) for part in error["loc"]))
            raise DomainError(_describe_flag(flag, error) if flag else f"override: {_describe(error)}") from None

    def n_latent(self) -> int | None:
        """W+ size of the domain's generator when it is a registry name (None for a file)."""
        from ipltool import hub
        from ipltool.models.generator_config import GeneratorConfig

        if _is_generator_file(self.generator):
            return None
        return GeneratorConfig.of_entry(hub.get_model(self.generator)).n_latent

    def resolved(self) -> "Domain":
        """A copy with derived defaults filled in (`adapt.auto_layer_k` from the generator size)."""
        n_latent = self.n_latent()
        if n_latent is None or self.adapt.auto_layer_k is not None:
            return self
        return self.with_overrides({"adapt.auto_layer_k": self.adapt.layer_k(n_latent)})

    def to_toml_dict(self) -> dict[str, Any]:
        """The resolved domain as plain data for TOML (None values left out)."""
        return tomlio.plain(self.model_dump())


# ----------------------------------------------------------------------------
# Reading and validating files


def _describe(error: dict) -> str:
    """One phrase for one pydantic error: the dotted key and what is wrong with it."""
    key = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unknown key {key!r}"
    if kind == "missing":
        return f"missing required key {key!r}"
    if kind == "value_error":
        return f"key {key!r}: {error['msg'].removeprefix('Value error, ')}"
    return f"key {key!r}: {_lower_first(error['msg'])} (got {_shown(error.get('input'))})"


def _shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` for a message, cut after `limit` characters: a 10 MB string or a deeply nested table is never quoted whole."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[:limit] + "…"


def _lower_first(text: str) -> str:
    # Only the first letter: the rest may quote a pattern such as '^[A-Za-z0-9]...'.
    return text[:1].lower() + text[1:]


_BOUNDS = {"greater_than_equal": ("≥", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("≤", "le"), "less_than": ("<", "lt")}


def _describe_flag(flag: str, error: dict) -> str:
    """One pydantic error about a key set by a command flag, in the flag's words: `--steps must be ≥ 1 (got -5)`."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _BOUNDS and _BOUNDS[kind][1] in ctx:
        sign, bound = _BOUNDS[kind]
        limit = ctx[bound]
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)  # `gt=0` on a float field: "> 0", not "> 0.0"
        return f"{flag} must be {sign} {limit} (got {_shown(value)})"
    if kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return f"{flag} must be {ctx.get('expected')} (got {_shown(value)}){did_you_mean(str(value), choices)}"
    if kind == "value_error":
        return f"{flag}: {error['msg'].removeprefix('Value error, ')}"
    return f"{flag}: {_lower_first(error['msg'])} (got {_shown(value)})"


def _line_of(text: str, loc: tuple) -> int | None:
    """Best-effort line number (1-based) of the key at `loc` in a TOML text."""
    path = [str(p) for p in loc if not isinstance(p, int)]
    if not path:
        return None
    table: list[str] = []
    key_re = re.compile(r"""^\s*["']?([A-Za-z0-9_.-]+)["']?\s*=""")
    header_re = re.compile(r"^\s*\[\[?\s*([A-Za-z0-9_.-]+)\s*\]\]?")
    fallback = None
    for number, line in enumerate(text.splitlines(), start=1):
        header = header_re.match(line)
        if header:
            table = header.group(1).split(".")
            if table == path:
                fallback = fallback or number
            continue
        key = key_re.match(line)
        if key:
            full = table + key.group(1).split(".")
            if full == path:
                return number
            if full == path[: len(full)] and fallback is None:
                fallback = number  # e.g. an inline table holding the key
    return fallback


def _too_large(text: str, origin: str) -> DomainError:
    """The error for a domain file over `MAX_FILE_CHARS`, naming its first line too long for any text."""
    for number, line in enumerate(text.splitlines(), start=1):
        if len(line) > MAX_TEXT_CHARS:
            key = re.match(r"""^\s*["']?([A-Za-z0-9_.-]+)["']?\s*=""", line)
            what, value = (f"key {key.group(1)!r}", line[key.end() :].strip().strip("\"'")) if key else ("a line", line)
            return DomainError(
                f"{origin}:{number}: {what} is too long ({len(value):,} characters): CLIP reads at most {CLIP_CONTEXT} tokens, "
                f"and no text over {MAX_TEXT_CHARS:,} characters fits"
            )
    return DomainError(f"{origin}: {len(text):,} characters; a domain file has at most {MAX_FILE_CHARS:,}")


def parse_domain(text: str, origin: str) -> Domain:
    """Parse and validate domain TOML `text`; `origin` names the file in error messages.

    Raises:
        DomainError: one line per problem, each naming the file, the line (where it can
            be found) and the key: `disney.toml:8: unknown key 'adapt.stepz'`.
    """
    if len(text) > MAX_FILE_CHARS:
        raise _too_large(text, origin)  # before tomllib, which takes most of a second over 10 MB
    try:
        data = tomlio.loads(text)
    except tomlio.TOMLDecodeError as err:
        raise DomainError(f"{origin}: invalid TOML: {err}", hint="check the quoting and brackets near that line") from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and inline tables
        raise DomainError(f"{origin}: invalid TOML: arrays or tables nested too deeply", hint="a domain file needs a few levels at most") from None
    try:
        return Domain.model_validate(data)
    except RecursionError:
        raise DomainError(f"{origin}: values nested too deeply", hint="a domain file needs a few levels at most") from None
    except ValidationError as err:
        problems = []
        for error in err.errors():
            line = _line_of(text, error["loc"])
            problems.append((line, f"{origin}:{line}: {_describe(error)}" if line else f"{origin}: {_describe(error)}"))
        # Every problem, in file order (those without a line, such as missing keys, last),
        # so that one edit fixes the file instead of one edit per run.
        problems.sort(key=lambda problem: (problem[0] is None, problem[0] or 0))
        message = "\n".join(text for _, text in problems)
        raise DomainError(message, hint="`ipl prompts show disney` prints a complete domain file") from None


def load_domain_file(path: str | Path) -> Domain:
    """Read and validate one domain file.

    Raises:
        DomainError: missing or unreadable file, bad TOML, or invalid contents.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DomainError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DomainError(f"{path}: cannot read: {err}") from None
    return parse_domain(text, str(path))


# ----------------------------------------------------------------------------
# Lookup

Origin = Literal["path", "user", "builtin", "plugin"]


@dataclass
class DomainEntry:
    """A domain file found by the lookup, valid or not.

    `origin` is where it was found; `shadowed_by` names the origin of the entry that
    wins when two share a name; `error` holds the validation message of a broken file.
    """

    name: str
    path: Path
    origin: Origin
    provider: str = ""
    domain: Domain | None = None
    error: str | None = None
    shadowed_by: str | None = None


def user_domain_dir() -> Path:
    """The user's domain directory: `$IPL_DOMAINS_DIR`, else `<user config dir>/ipltool/domains`."""
    env = os.environ.get("IPL_DOMAINS_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("ipltool")) / "domains"


def builtin_domain_dir() -> Path:
    """The directory of domain files shipped inside the package."""
    return Path(str(resources.files("ipltool") / "domains"))


def _scan(directory: Path, origin: Origin, provider: str) -> list[DomainEntry]:
    entries = []
    if not directory.is_dir():
        return entries
    for path in sorted(directory.glob("*.toml")):
        try:
            domain = load_domain_file(path)
            entries.append(DomainEntry(domain.name, path, origin, provider, domain=domain))
        except DomainError as err:
            entries.append(DomainEntry(path.stem, path, origin, provider, error=err.message))
    return entries


def discover_domains() -> list[DomainEntry]:
    """Every domain file from the user dir, the built-ins and plugin packs, in lookup order.

    An entry whose name an earlier entry already uses gets `shadowed_by` set.
    """
    from ipltool import registry  # late import: registry imports plugins lazily as well

    entries = _scan(user_domain_dir(), "user", "user dir")
    entries += _scan(builtin_domain_dir(), "builtin", "ipltool")
    for provider, directory in registry.domain_pack_dirs():
        entries += _scan(directory, "plugin", provider)
    winners: dict[str, DomainEntry] = {}
    for entry in entries:
        if entry.name in winners:
            entry.shadowed_by = winners[entry.name].origin
        else:
            winners[entry.name] = entry
    return entries


def _is_generator_file(value: str) -> bool:
    """A `generator` value that names a checkpoint file rather than a registry entry."""
    return _looks_like_path(value) or value.endswith((".pt", ".pth", ".pkl"))


def _looks_like_path(value: str) -> bool:
    return value.endswith(".toml") or os.sep in value or "/" in value


def _long_name(name: str) -> DomainError:
    return DomainError(
        f"--domain {_shown(name, 40)}: too long for a domain name (at most {MAX_NAME_LENGTH} characters)",
        hint="pass a known name (see `ipl prompts list`) or the path of a .toml file",
    )


def find_domain(name_or_path: str) -> DomainEntry:
    """Resolve `--domain X` to a valid domain (see the module docstring for the order).

    Raises:
        DomainError: X is neither an existing file nor a known name, or the file is invalid.
    """
    candidate = Path(name_or_path).expanduser()
    try:
        is_file = candidate.is_file()
    except OSError as err:  # e.g. "File name too long": not a file, and no domain is named so
        if not _looks_like_path(name_or_path):
            raise _long_name(name_or_path) from None
        raise DomainError(f"--domain {_shown(name_or_path)}: {err.strerror or err}") from None
    if is_file:
        return DomainEntry(candidate.stem, candidate, "path", str(candidate), domain=load_domain_file(candidate))
    if _looks_like_path(name_or_path):
        raise DomainError(f"{name_or_path}: no such file")
    if len(name_or_path) > MAX_NAME_LENGTH:
        raise _long_name(name_or_path)
    entries = [e for e in discover_domains() if e.name == name_or_path and e.shadowed_by is None]
    if not entries:
        known = sorted({e.name for e in discover_domains() if e.error is None})
        raise unknown_name(
            "domain", name_or_path, known, label="known domains", hint="or pass a path to a .toml file", error=DomainError
        )
    entry = entries[0]
    if entry.error:
        raise DomainError(entry.error)
    return entry


def load_domain(name_or_path: str) -> Domain:
    """Shortcut for `find_domain(name_or_path).domain`."""
    return find_domain(name_or_path).domain
