"""Time the authors' own IPL training steps on this machine's CPU, at the settings of `train_steps.py`.

The authors' code is the CVPR 2023 IPL release (Picsart-AI-Research/IPL-Zero-Shot-
Generative-Model-Adaptation) with OpenAI's CLIP; it is called, never copied. Point the
script at exports of the revisions pinned in `tools/make_goldens.py` (PINNED), e.g.

    git --git-dir=<mirror> archive <commit> <paths> | tar -x -C /tmp/authors/ipl

and run one case per call (nothing is fetched, nothing is written to RESULTS.md):

    python benchmarks/authors_steps.py --ipl /tmp/authors/ipl --nada /tmp/authors/nada \\
        --clip /tmp/authors/clip --case stage2 --size 64 --steps 4 --json

`--nada` is only checked (it is one of the pinned sources, as for `make_goldens.py`);
the IPL run does not import it.

Settings, the same as `benchmarks/train_steps.py` (its DOMAIN, parsed by ipltool, gives
every value passed to their flags): stage 1 is their mapper loop at `--batch_mapper 32`;
stage 2 is their generator loop at `--batch 2` with the adaptive layer choice on
(`--auto_layer_iters 1 --auto_layer_batch 8 --auto_layer_k int(2 * n_latent / 3)`). The
networks have random weights, the arithmetic of pretrained ones: a config-f StyleGAN2
(channel multiplier 2, 512-d W, 8 mapping layers) at `--size` with noise strengths 0.1,
and a full-size ViT-B/32, written as the files their code loads by
`make_goldens.write_fixture`. The other stage runs 0 iterations (`--iter 0` or
`--iter_mapper 0`: stage 2 then uses their freshly initialised mapper).

Each case runs their `train(args)` in a subprocess of its own, so its peak memory (RSS)
is its own, through `make_goldens.run_job`: the run-time patches documented in
`tools/make_goldens.py` (their CUDA kernels and devices on the CPU, the fixture's CLIP
for `clip.load`, and so on) and no others. The thread count is set back to torch's
default, which `train_steps.py` uses (`run_job` asks for one thread per CPU).

What one step's time covers: from the call of `mixing_noise` that opens an iteration of
their training loop to the return of its last statement, `m_optim.step()` in stage 1 and
`ema(...)` in stage 2; that is, the latents, the mapper, their text features, the
renders, the loss, backward, the optimizer step and (stage 2) the layer choice
(`determine_opt_layers`, inside `ZSSGAN.forward`) and the EMA update: the work of one
`stage1_step` / `stage2_step` of ipltool. The wrappers only read the clock. As in
`train_steps.py`, the first step is left out of the median. Their step also re-encodes
fixed text (template sentences, the target label of the layer choice) every time: that is
their code's cost, and it is counted. Their set-up (loading, `mean_latent`) is not.

Peak RSS is that of the child: their three generators (G_s, G_t, G_ema), the ViT-B/32
and the second CLIP their `CLIPLoss` always loads, "RN50" for a texture loss that stays
off, which the fixture's `clip.load` patch serves as a second ViT-B/32 (about 0.2 GB
more than an RN50 in float32).

Run it on an otherwise idle machine: beside other torch processes the threads
oversubscribe the cores and a step can take several times as long.

Output: one line with the per-step seconds, the median, peak RSS in GB and torch's
thread count; `--json` prints it as one JSON line. The authors' own messages (and tqdm)
go to stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAKE_GOLDENS = HERE.parent / "tools" / "make_goldens.py"
FAR_AWAY = "1000000"  # an interval (their --save_interval) that a benchmark never reaches


def load_module(name: str, path: Path) -> types.ModuleType:
    """Import a script that is not in a package (tools/make_goldens.py, benchmarks/train_steps.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports kB), as train_steps.py measures it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


# ----------------------------------------------------------------------------
# The parent: sources, settings, fixture files, one subprocess


def check_sources(goldens: types.ModuleType, args: argparse.Namespace) -> dict[str, str]:
    """One-line errors for a missing or wrong source folder; return the commits used (make_goldens' check)."""
    paths = {"ipl": args.ipl, "nada": args.nada, "clip": args.clip}
    for key, path in paths.items():
        if not path.is_dir():
            repository, commit = goldens.PINNED[key]
            sys.exit(f"error: --{key} {path}: no such folder (pass an export of {repository} at {commit})")
    return goldens._check_sources({key: path.resolve() for key, path in paths.items()}, args.any_revision)


def bench_settings(case: str, size: int, steps: int) -> types.SimpleNamespace:
    """train_steps.py's settings, shaped like tests/golden_fixture.py so that make_goldens' `_argv` spells their flags."""
    from ipltool.domain import parse_domain
    from ipltool.models.generator_config import GeneratorConfig

    ours = load_module("train_steps", HERE / "train_steps.py")
    generator = GeneratorConfig(size=size, channel_multiplier=2)  # config-f: 512-d W, 8 mapping layers
    # The same override as train_steps.run_case: the reference's k for this size.
    domain = parse_domain(ours.DOMAIN, "bench.toml").with_overrides({"adapt.auto_layer_k": int(2 * generator.n_latent / 3)})
    mapper, adapt, loss = domain.mapper, domain.adapt, domain.loss
    return types.SimpleNamespace(
        GENERATOR=generator, SOURCE=domain.source, TARGET=domain.target, CTX_INIT=domain.ctx_init, MIXING=adapt.mixing,
        STAGE1={"seed": mapper.seed, "batch": mapper.batch, "steps": steps if case == "stage1" else 0, "lr": mapper.lr,
                "lambda_l": loss.lambda_l, "lambda_src": loss.lambda_src},
        STAGE2={"seed": adapt.seed, "batch": adapt.batch, "steps": steps if case == "stage2" else 0, "lr": adapt.lr,
                "ema": adapt.ema, "n_sample": adapt.n_sample, "auto_layer_k": adapt.auto_layer_k,
                "auto_layer_iters": adapt.auto_layer_iters, "auto_layer_batch": adapt.auto_layer_batch},
    )


def authors_argv(goldens: types.ModuleType, settings: types.SimpleNamespace, files: dict, work: Path) -> list[str]:
    """Their command line: make_goldens' flags with the benchmark's values, then two overrides (argparse keeps the last)."""
    argv = goldens._argv("ipl", files, str(work), {}, settings)
    # No checkpoint of G_ema mid-run (their save would follow the last timed step anyway);
    # the mixing probability is the domain's, which _argv leaves at their default.
    return argv + ["--save_interval", FAR_AWAY, "--mixing", str(settings.MIXING)]


def run_case(args: argparse.Namespace) -> dict:
    """Write the fixture files, run the authors' training in a child process, return its figures."""
    goldens = load_module("make_goldens", MAKE_GOLDENS)
    commits = check_sources(goldens, args)
    settings = bench_settings(args.case, args.size, args.steps)
    with tempfile.TemporaryDirectory(prefix="ipl-authors-steps-") as tmp:
        folder = Path(tmp)
        files = goldens.write_fixture(folder, size=args.size)
        job = {"code": "ipl", "source": str(args.ipl.resolve()), "clip_source": str(args.clip.resolve()),
               "files": files, "work": str(folder / "work"), "options": {}, "out": str(folder / "result.json"),
               "argv": authors_argv(goldens, settings, files, folder / "work"), "case": args.case}
        # Their prints go to our stderr, so that stdout carries only the result.
        done = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], check=False, stdout=sys.stderr)
        if done.returncode != 0:
            sys.exit(f"error: the authors' {args.case} run failed (exit {done.returncode}); its output is above")
        timings = json.loads(Path(job["out"]).read_text())
    batch = settings.STAGE1["batch"] if args.case == "stage1" else settings.STAGE2["batch"]
    seconds = timings["seconds"]
    return {
        "code": "authors", "case": args.case, "size": args.size, "batch": batch, "steps": args.steps,
        "seconds": [round(t, 3) for t in seconds],
        "median_s": round(statistics.median(seconds[1:] or seconds), 3),
        "peak_rss_gb": timings["peak_rss_gb"], "threads": timings["threads"],
        "sources": commits,
    }


# ----------------------------------------------------------------------------
# The child: their training, its loop timed


class StepClock:
    """Per-step wall time of the authors' loop, read by wrappers that call through unchanged."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.started: float | None = None

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self) -> None:
        if self.started is not None:
            self.seconds.append(time.perf_counter() - self.started)
            self.started = None

    def install(self, train: types.ModuleType, case: str) -> None:
        """Start at their loop's `mixing_noise`; stop after `Adam.step` (stage 1) or `ema` (stage 2)."""
        import torch

        # Both are globals of their train module, looked up at each call: replacing them there
        # changes no other caller (ZSSGAN's layer choice draws with torch.randn).
        mixing_noise, ema = train.mixing_noise, train.ema

        def timed_mixing_noise(*a, **k):
            self.start()
            return mixing_noise(*a, **k)

        def timed_ema(*a, **k):
            out = ema(*a, **k)
            self.stop()
            return out

        train.mixing_noise = timed_mixing_noise
        if case == "stage2":
            train.ema = timed_ema
        else:
            # Only their m_optim steps in this case: stage 2 runs 0 iterations.
            adam_step = torch.optim.Adam.step

            def timed_step(optimizer, *a, **k):
                out = adam_step(optimizer, *a, **k)
                self.stop()
                return out

            torch.optim.Adam.step = timed_step


def run_child(job: dict) -> None:
    """Run their training through make_goldens.run_job with the clock installed; write the timings to job["out"]."""
    import torch

    threads = torch.get_num_threads()  # torch's default, before run_job asks for one per CPU
    goldens = load_module("make_goldens", MAKE_GOLDENS)
    clock = StepClock()

    def instrument(train: types.ModuleType) -> None:
        torch.set_num_threads(threads)
        clock.install(train, job["case"])

    goldens.run_job(job, instrument=instrument)
    result = {"seconds": clock.seconds, "peak_rss_gb": round(peak_rss_gb(), 2), "threads": torch.get_num_threads()}
    Path(job["out"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--job":
        run_child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ipl", type=Path, required=True, help="export of Picsart-AI-Research/IPL-Zero-Shot-Generative-Model-Adaptation")
    parser.add_argument("--nada", type=Path, required=True, help="export of rinongal/StyleGAN-nada (checked only)")
    parser.add_argument("--clip", type=Path, required=True, help="export of openai/CLIP (its `clip` package)")
    parser.add_argument("--case", choices=["stage1", "stage2"], required=True)
    parser.add_argument("--size", type=int, default=64, help="generator resolution (64 or 256 in RESULTS.md)")
    parser.add_argument("--steps", type=int, default=4, help="steps to time (the first is not counted)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--any-revision", action="store_true", help="accept git checkouts at other commits than the pinned ones")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if not 32 <= args.size <= 1024 or args.size & (args.size - 1):
        parser.error("--size must be a power of two from 32 to 1024")
    result = run_case(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"authors' {result['case']} @ {result['size']}, batch {result['batch']}: median {result['median_s']} s/step "
              f"(steps {result['seconds']}), peak RSS {result['peak_rss_gb']} GB, {result['threads']} torch threads")


if __name__ == "__main__":
    main()
