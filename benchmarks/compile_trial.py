"""Does `torch.compile` pay for a whole IPL run? Eager against compiled training steps, compile time included.

`--case stage1` compiles the synthesis of G_s (stage 1's renders, without gradients) and
CLIP's image tower in the stage-1 case of `train_steps.py`. The default, stage 2, runs the
stage-2 case of `train_steps.py` (config-f StyleGAN2 with random weights, full
ViT-B/32, batch 2, adaptive layer choice) twice in fresh processes: eagerly, and with
`torch.compile` (inductor, static shapes: the layer choice and the step use two batch sizes, and inductor fails on this graph with dynamic ones) on the synthesis of G_s and G_t and on CLIP's image tower,
which is where the modulation, bias, leaky ReLU and noise additions could fuse. It
reports the seconds of each step, the number of graphs dynamo compiled, and projects a
600-step run (the paper's 300 + 300) as the steps that ran + the rest x median step.

    python benchmarks/compile_trial.py --size 64 --steps 8 --precision bf16
    python benchmarks/compile_trial.py --size 64 --steps 8 --precision fp32 --no-write

The inductor cache starts empty, so the compile time is the cold one a first run pays;
`--warm` adds a third run on the cache the second filled, as a later run would find it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS_600 = 600


def run(case: str, size: int, steps: int, precision: str, compiled: bool) -> dict:
    """The steps of `case` in this process; compiled or eager."""
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(HERE))
    import train_steps

    from ipltool.train import stage1, stage2

    if compiled and case == "stage1":
        # What `--compile` does (`ipltool.compiled`): G_s's synthesis and CLIP's image tower, for stage 1.
        from ipltool.compiled import compiled_renders

        real_train = stage1.train_mapper

        def train_compiled(mapper, source, prompts, *args, **kwargs):
            with compiled_renders(source, [prompts.clip]):
                return real_train(mapper, source, prompts, *args, **kwargs)

        stage1.train_mapper = train_compiled  # run_case imports it inside, so patching the module reaches it
    elif compiled:
        from ipltool.models import clip as clip_module

        real_start, real_load = stage2.start_stage2, clip_module.load_clip

        def start_compiled(source, domain, precision_):
            state = real_start(source, domain, precision_)
            for generator in (source, state.trainable):
                generator.synthesis = torch.compile(generator.synthesis, dynamic=False)
            return state

        def load_compiled(*args, **kwargs):
            clip = real_load(*args, **kwargs)
            clip.model.encode_image = torch.compile(clip.model.encode_image, dynamic=False)
            return clip

        stage2.start_stage2, clip_module.load_clip = start_compiled, load_compiled
    result = train_steps.run_case(case, size, steps, "cpu", 8, precision)
    result["graphs"] = int(counters["stats"]["unique_graphs"])
    return result


def measure(case: str, size: int, steps: int, precision: str, compiled: bool, cache: str) -> dict:
    """`run` in a fresh process whose inductor cache is `cache` (an empty folder: a cold compile)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    cmd = [sys.executable, __file__, "--inner", "--case", case, "--size", str(size), "--steps", str(steps), "--precision", precision]
    if compiled:
        cmd.append("--compiled")
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - start, 1)
    seconds = result["seconds"]
    # Every step that ran counts as it was (later steps can compile too: another batch size, other layers trained).
    result["projected_600_s"] = round(sum(seconds) + (STEPS_600 - len(seconds)) * statistics.median(seconds[1:]), 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["stage1", "stage2"], default="stage2")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--warm", action="store_true", help="also time a second compiled run that reuses the first one's inductor cache")
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(run(args.case, args.size, args.steps, args.precision, args.compiled)))
        return 0
    with tempfile.TemporaryDirectory() as cache:
        rows = {mode: measure(args.case, args.size, args.steps, args.precision, mode == "compiled", cache) for mode in ("eager", "compiled")}
        if args.warm:  # a later run: the same inductor cache, now filled
            rows["compiled, warm cache"] = measure(args.case, args.size, args.steps, args.precision, True, cache)
    for mode, r in rows.items():
        print(f"{mode}: first step {r['seconds'][0]} s, median {r['median_s']} s, graphs {r['graphs']}, "
              f"600 steps ~{r['projected_600_s']} s, steps {r['seconds']}, peak {r['peak_rss_gb']} GB", flush=True)
    if not args.no_write:
        lines = [f"\n## torch.compile trial, {args.case}, {date.today().isoformat()}, cpu, {args.precision}", "",
                 f"Command: `python benchmarks/compile_trial.py --case {args.case} --size {args.size} --steps {args.steps} --precision {args.precision}{' --warm' if args.warm else ''}`", "",
                 "| mode | first step (s, compile included) | median step (s) | graphs | 600 steps projected (s) |",
                 "|---|---|---|---|---|"]
        for mode, r in rows.items():
            lines.append(f"| {mode} | {r['seconds'][0]} | {r['median_s']} | {r['graphs']} | {r['projected_600_s']} |")
        lines.append("\nPer-step seconds: " + "; ".join(f"{mode} {r['seconds']}" for mode, r in rows.items()) + "\n\n")
        path = HERE / "RESULTS.md"
        path.write_text(path.read_text() + "\n".join(lines))
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
