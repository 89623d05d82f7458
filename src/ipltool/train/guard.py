"""Guards of the training loops: non-finite numbers, runs of skipped fp16 steps, and memory.

A diverged run must fail, never write NaN weights as a result. `StepGuard.check` runs
after every step, before the loop logs, samples or saves anything: it looks at the
step's loss (already a float for the log, so free) and at the largest |value| of the
parameters the step updated (one fused reduction and one sync). A non-finite value
raises `NonFiniteError` naming the stage, the step and the likely cause; the run
directory keeps its last saved state, which was checked the same way.

fp16's `GradScaler` skips a step whose gradients overflowed and halves its scale; that is
normal. `MAX_SKIPPED_STEPS` skips in a row are not.

Memory: `check_memory` refuses a batch whose activations alone surely exceed the
device's memory before a run directory exists (a lower bound, never a false refusal),
and `StepGuard.step` turns an allocation failure during a step into one line that names
the flag to lower.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ipltool.errors import NonFiniteError, UsageError
from ipltool.precision import FP32, Precision

#: Consecutive steps the fp16 loss scaler may skip before the run counts as diverged.
MAX_SKIPPED_STEPS = 10
#: A learning rate this many times the reference's is named as the likely cause of a divergence.
LARGE_LR_FACTOR = 10

_OOM = re.compile(r"out of memory|can't allocate memory|not enough memory", re.IGNORECASE)
_TRIED = re.compile(r"tried to allocate (\d+) bytes", re.IGNORECASE)


# ----------------------------------------------------------------------------
# Finiteness


def max_abs(tensors: Iterable[torch.Tensor]) -> float:
    """The largest |value| over the floating-point `tensors`: NaN if any is NaN, inf if any is infinite; 0.0 for none.

    One min/max reduction per tensor (no copy, no overflow: squares or sums of huge finite
    weights would read as inf) and one host sync; about 10 ms for the 30 M weights of a
    1024 px generator on 2 CPU cores.
    """
    tensors = [t.detach() for t in tensors if t.is_floating_point() and t.numel()]
    if not tensors:
        return 0.0
    device = tensors[0].device
    # aminmax propagates NaN; torch._foreach_norm(inf) does too but is 20x slower on CPU.
    extremes = [torch.stack(torch.aminmax(t)).to(device, torch.float32) for t in tensors]
    return torch.cat(extremes).abs().max().item()


def _tensors(source) -> list[torch.Tensor]:
    """Parameters of a module (not its buffers: CLIP's causal mask holds -inf on purpose), or the tensors of a list / dict."""
    if isinstance(source, torch.nn.Module):
        return list(source.parameters())
    if isinstance(source, dict):
        return [t for value in source.values() for t in _tensors(value)]
    if isinstance(source, (list, tuple)):
        return [t for value in source for t in _tensors(value)]
    return [source] if isinstance(source, torch.Tensor) else []


def describe(value: float) -> str:
    """`NaN`, `inf` or `-inf`: how messages name a non-finite value."""
    return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def first_nonfinite(named: dict[str, object]) -> tuple[str, float] | None:
    """The first `(name, value)` of `named` (name -> module, tensors or state dict) holding a non-finite value."""
    for name, source in named.items():
        value = max_abs(_tensors(source))
        if not math.isfinite(value):
            return name, value
    return None


# ----------------------------------------------------------------------------
# The step guard


class StepGuard:
    """Stops a training loop at the first non-finite loss or weight, or at a run of skipped fp16 steps.

    Args:
        stage: how messages name the loop ("stage 1", "stage 2").
        trained: returns the tensors the last step may have updated (called after every step).
        lr: the learning rate; `lr_flag` its flag ("--lr"), `reference_lr` the reference value.
        precision: the run's precision (a reduced one is named as a possible cause).
        scaler: the step's loss scaler; only an enabled one (fp16) can skip steps.
        inputs: what the steps read but do not train, `{description: module or tensors}`,
            e.g. `{"the mapper runs/x/mapper.pt": mapper}`; looked at only after a failure,
            to name a non-finite input as the cause.
        lower: the flags that lower memory use, for an allocation failure's hint.
        max_skipped: consecutive skipped fp16 steps that end the run.

    Attributes:
        saved_step: the step of the last state the run saved (the runner sets it); the hint says it is kept.
    """

    def __init__(
        self,
        stage: str,
        trained: Callable[[], Iterable[torch.Tensor]],
        *,
        lr: float,
        reference_lr: float,
        lr_flag: str = "--lr",
        precision: Precision = FP32,
        scaler: torch.amp.GradScaler | None = None,
        inputs: dict[str, object] | None = None,
        lower: str = "--batch",
        max_skipped: int = MAX_SKIPPED_STEPS,
    ):
        self.stage = stage
        self.trained = trained
        self.lr, self.reference_lr, self.lr_flag = lr, reference_lr, lr_flag
        self.precision = precision
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.inputs = inputs or {}
        self.lower = lower
        self.max_skipped = max_skipped
        self.saved_step: int | None = None
        self._scale = self.scaler.get_scale() if self.scaler is not None else None
        self._skipped = 0

    # -- checks -------------------------------------------------------------------

    def check(self, step: int, loss: float) -> None:
        """After step `step` (1-based) with loss `loss`: raise `NonFiniteError` on a divergence.

        Order: a skipped fp16 step (the scaler lowered its scale) is counted, and tolerated
        until `max_skipped` in a row, even with a non-finite loss (the scaler skipped the
        update); otherwise the loss must be finite. The trained weights must be finite in
        every case.
        """
        skipped = False
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            skipped, self._scale = scale < self._scale, scale
        if skipped:
            self._skipped += 1
            if self._skipped >= self.max_skipped:
                raise NonFiniteError(
                    f"{self.stage} step {step}: the fp16 loss scaler skipped {self._skipped} steps in a row (their gradients overflow)",
                    hint="start again with --precision bf16 or fp32, or a smaller " + self.lr_flag + self._kept(),
                )
        else:
            self._skipped = 0
            if not math.isfinite(loss):
                raise self._failure(step, f"the loss is {describe(loss)}")
        peak = max_abs(self.trained())
        if not math.isfinite(peak):
            raise self._failure(step, f"the updated weights hold {describe(peak)} values")

    def check_start(self, origin: str, more: dict[str, object] | None = None) -> None:
        """Before the first step of a resumed run: the restored weights must be finite.

        Args:
            origin: where they came from (the `state.pt` path), for the message.
            more: other restored tensors to check, `{name: module or tensors}` (the EMA, the optimizer state).
        """
        found = first_nonfinite({"weights": list(self.trained()), **(more or {})})
        if found is not None:
            name, value = found
            raise NonFiniteError(
                f"{origin} holds {describe(value)} values (in its {name})",
                hint="the saved state is unusable: delete it to train that stage from the start",
            )

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Context of one step: an allocation failure inside becomes a one-line `UsageError` naming `lower`."""
        try:
            yield
        except (RuntimeError, MemoryError) as err:  # torch.OutOfMemoryError is a RuntimeError
            if not isinstance(err, MemoryError) and not _OOM.search(str(err)):
                raise
            tried = _TRIED.search(str(err))
            detail = f" (it tried to allocate {_gib(int(tried.group(1)))})" if tried else ""
            raise UsageError(f"{self.stage} step {step}: out of memory{detail}", hint=f"start again with a lower {self.lower}{self._kept()}") from None

    # -- messages -------------------------------------------------------------------

    def _failure(self, step: int, what: str) -> NonFiniteError:
        return NonFiniteError(f"{self.stage} step {step}: {what}", hint=self._cause() + self._kept())

    def _cause(self) -> str:
        """The likely cause, most specific first: a non-finite input, a large learning rate, a reduced precision."""
        found = first_nonfinite(self.inputs)
        if found is not None:
            return f"likely cause: {found[0]} holds {describe(found[1])} weights; use a finite one"
        if not math.isfinite(self.lr) or self.lr > LARGE_LR_FACTOR * self.reference_lr:
            return f"likely cause: the learning rate ({self.lr_flag} {self.lr:g}, the reference uses {self.reference_lr:g}); start again with a smaller one"
        if self.precision.reduced:
            return f"likely cause: --precision {self.precision.name} overflowed; start again with --precision fp32"
        return f"the inputs are finite: start again with a smaller {self.lr_flag} (now {self.lr:g})"

    def _kept(self) -> str:
        return f"; the run keeps its last finite state (step {self.saved_step})" if self.saved_step else ""


# ----------------------------------------------------------------------------
# Memory


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: free GPU memory, or MemAvailable + SwapFree; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", text, re.MULTILINE))
    if "MemAvailable" not in fields:
        return None
    return (int(fields["MemAvailable"]) + int(fields.get("SwapFree", 0))) * 1024


def reset_peak_memory(device: torch.device | str) -> None:
    """Start counting `peak_memory(device)` from now: the GPU's allocator statistics, or the process's peak resident set (Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        try:  # "5" resets VmHWM, the peak resident set (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # then the peak counts from the process's start


def peak_memory(device: torch.device | str) -> int | None:
    """Bytes at the peak since `reset_peak_memory`: what the GPU allocator reserved, or the resident set on a CPU; None if unknown.

    On a GPU this is what the card had to hold for the tensors (the allocator's cache
    included, the CUDA context of about 0.5 GB not); on a CPU the whole process
    (libraries and models included).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_reserved(device))
    if device.type != "cpu":
        return None
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        found = None
    if found:
        return int(found.group(1)) * 1024
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, kB elsewhere


def describe_peak(device: torch.device | str, peak: int | None) -> str:
    """`peak memory 11.2 GiB (cuda, allocator)` for the end of a run, or `peak memory unknown (mps)`."""
    if peak is None:
        return f"peak memory unknown ({torch.device(device).type})"
    what = "allocator" if torch.device(device).type == "cuda" else "resident"
    return f"peak memory {_gib(peak)} ({torch.device(device).type}, {what})"


def _activation_bytes(generator) -> int:
    """Lower bound of the float32 activations one image keeps for the backward pass: one tensor per conv layer."""
    size = generator.size
    total = generator.channels[4] * 4 * 4  # conv1
    res = 8
    while res <= size:
        total += 2 * generator.channels[res] * res * res  # the upsampling conv and the conv after it
        res *= 2
    return 4 * total


def _noise_bytes(generator) -> int:
    """float32 per-layer noise of one image (stage 1 draws it for the whole batch at once)."""
    return 4 * sum((2 ** ((layer + 5) // 2)) ** 2 for layer in range(generator.num_layers))


def memory_needs(domain, generator, stages: Iterable[str], command: str = "adapt", chunk: int | None = None) -> list[tuple[str, int, str]]:
    """Lower bounds of what the batch settings need: `(what, bytes, how to lower it)`.

    Args:
        domain: the resolved domain ([mapper] and [adapt] batch sizes).
        generator: the source generator (its channels and resolution set the cost per image).
        stages: "mapper" and/or "adapt", the stages the command will run.
        command: "adapt" or "train-mapper": which flag sets which batch.
        chunk: images the layer choice renders at once (`--chunk`; None: its whole batch).
    """
    needs = []
    if "mapper" in stages:
        batch = domain.mapper.batch
        flag = "--batch" if command == "train-mapper" else "--set mapper.batch=N"
        needs.append((f"mapper.batch = {batch}", batch * _noise_bytes(generator), f"lower it with {flag}"))
    if "adapt" in stages:
        per_image = _activation_bytes(generator)
        needs.append((f"adapt.batch = {domain.adapt.batch}", domain.adapt.batch * per_image, "lower it with --batch"))
        if domain.adapt.auto_layer_iters > 0:
            n = domain.adapt.auto_layer_batch
            # The whole batch's noise and W+ codes are drawn at once; its renders hold
            # one chunk's activations at a time.
            held = _noise_bytes(generator) + 2 * 4 * generator.n_latent * generator.style_dim
            needs.append((f"adapt.auto_layer_batch = {n}", n * held, "lower it with --set adapt.auto_layer_batch=N"))
            at_once = min(chunk or n, n)
            what = f"the layer choice's renders ({at_once} at a time, --chunk)" if at_once < n else f"adapt.auto_layer_batch = {n}"
            needs.append((what, at_once * per_image, "render fewer at once with --chunk N (the same results)"))
    return needs


def check_memory(
    domain, generator, device: torch.device | str, stages: Iterable[str], command: str = "adapt", chunk: int | None = None
) -> None:
    """Refuse, before anything runs, a batch setting that surely does not fit in the memory of `device`.

    The estimate is a lower bound (one float32 tensor per generator layer and image), so a
    refused setting cannot fit; one that passes may still fail, and then `StepGuard.step`
    names the flag. Arguments as `memory_needs`.

    Raises:
        UsageError: `adapt.batch = 100000 needs at least 33.4 GiB of memory on cpu; 24.0 GiB is available`.
    """
    device = torch.device(device)
    available = available_memory(device)
    if available is None:
        return
    for setting, need, hint in memory_needs(domain, generator, stages, command, chunk):
        if need > available:
            raise UsageError(
                f"{setting} needs at least {_gib(need)} of memory on {device}; {_gib(available)} is available",
                hint=hint,
            )
