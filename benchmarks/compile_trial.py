"""Does `torch.compile` pay for a whole IPL run? Eager against compiled training steps, compile time included.

Runs the stage-2 case of `train_steps.py` (config-f StyleGAN2 with random weights, full
ViT-B/32, batch 2, adaptive layer choice) twice in fresh processes: eagerly, and with
`torch.compile` (inductor, static shapes: the layer choice and the step use two batch sizes, and inductor fails on this graph with dynamic ones) on the synthesis of G_s and G_t and on CLIP's image tower,
which is where the modulation, bias, leaky ReLU and noise additions could fuse. It
reports the seconds of each step, the number of graphs dynamo compiled, and projects a
600-step run (the paper's 300 + 300) as the steps that ran + the rest x median step.

    python benchmarks/compile_trial.py --size 64 --steps 8 --precision bf16
    python benchmarks/compile_trial.py --size 64 --steps 8 --precision fp32 --no-write

The inductor cache goes to a fresh folder per run, so the compile time is the cold one a
first run pays.
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


def run(size: int, steps: int, precision: str, compiled: bool) -> dict:
    """The stage-2 steps in this process; compiled or eager."""
    import torch
    from torch._dynamo.utils import counters

    sys.path.insert(0, str(HERE))
    import train_steps

    from ipltool.train import stage2

    if compiled:
        # run_case imports these two inside, so patching the modules reaches it.
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
    result = train_steps.run_case("stage2", size, steps, "cpu", 8, precision)
    result["graphs"] = int(counters["stats"]["unique_graphs"])
    return result


def measure(size: int, steps: int, precision: str, compiled: bool) -> dict:
    """`run` in a fresh process with its own empty inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, __file__, "--inner", "--size", str(size), "--steps", str(steps), "--precision", precision]
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
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(run(args.size, args.steps, args.precision, args.compiled)))
        return 0
    rows = {mode: measure(args.size, args.steps, args.precision, mode == "compiled") for mode in ("eager", "compiled")}
    for mode, r in rows.items():
        print(f"{mode}: first step {r['seconds'][0]} s, median {r['median_s']} s, graphs {r['graphs']}, "
              f"600 steps ~{r['projected_600_s']} s", flush=True)
    if not args.no_write:
        lines = [f"\n## torch.compile trial, stage 2, {date.today().isoformat()}, cpu, {args.precision}", "",
                 f"Command: `python benchmarks/compile_trial.py --size {args.size} --steps {args.steps} --precision {args.precision}`", "",
                 "| mode | first step (s, compile included) | median step (s) | graphs | 600 steps projected (s) |",
                 "|---|---|---|---|---|"]
        for mode, r in rows.items():
            lines.append(f"| {mode} | {r['seconds'][0]} | {r['median_s']} | {r['graphs']} | {r['projected_600_s']} |")
        lines.append(f"\nPer-step seconds: eager {rows['eager']['seconds']}; compiled {rows['compiled']['seconds']}\n\n")
        path = HERE / "RESULTS.md"
        path.write_text(path.read_text() + "\n".join(lines))
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
