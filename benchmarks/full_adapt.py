"""Time one whole `ipl adapt` with full-size random networks, through the real command line.

Writes a random config-f StyleGAN2 (`--size`, noise strengths 0.1) and a random ViT-B/32
as the files `ipl adapt` loads (`--set generator=FILE`, `--clip ViT-B-32:FILE`), then runs
`ipl adapt --domain disney` in this process with `--mapper-steps` + `--adapt-steps` steps.
The run's own log gives the seconds of every step; the report gives the wall time, the
median step of each stage, the projection to the paper's 300 + 300 steps (wall time +
remaining steps x median step, stated as a projection when fewer steps ran), the peak
GPU memory (CUDA) and the peak resident memory.

    python benchmarks/full_adapt.py --size 1024 --device cuda --precision bf16          # on a GPU
    python benchmarks/full_adapt.py --size 64 --device cpu --mapper-steps 2 --adapt-steps 2   # plumbing check

Random weights do the arithmetic of pretrained ones; the losses mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

PAPER_STEPS = 300  # per stage, docs/method.md


def write_models(folder: Path, size: int) -> tuple[Path, Path]:
    """A random config-f generator checkpoint and a random ViT-B/32 state dict, as the CLI loads them."""
    import logging

    import open_clip
    import torch

    from ipltool.models.stylegan2 import GeneratorConfig, build_generator, generator_checkpoint

    generator = folder / f"stylegan2-config-f-{size}-random.pt"
    torch.save(generator_checkpoint(build_generator(GeneratorConfig(size=size), seed=0, noise_strength=0.1)), generator)
    clip = folder / "vit-b-32-random.pt"
    logging.disable(logging.WARNING)  # open_clip says the init is random, which is the point
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), clip)
    logging.disable(logging.NOTSET)
    return generator, clip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--mapper-steps", type=int, default=PAPER_STEPS)
    parser.add_argument("--adapt-steps", type=int, default=PAPER_STEPS)
    parser.add_argument("--chunk", type=int, default=8, help="`ipl adapt --chunk`: images stage 1 and the layer choice render at once")
    parser.add_argument("--compile", action="store_true", help="`ipl adapt --compile` (stage 1's renders through torch.compile)")
    parser.add_argument("--work", type=Path, help="folder for the model files and the run (default: a temporary one)")
    args = parser.parse_args()

    import torch

    from ipltool.cli import main as ipl
    from ipltool.domain import Adapt
    from ipltool.train.run import RunDir

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        generator, clip = write_models(work, args.size)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        command = ["--device", args.device, "--quiet", "adapt", "--domain", "disney", "--set", f"generator={generator}",
                   "--clip", f"ViT-B-32:{clip}", "--set", f"mapper.steps={args.mapper_steps}", "--set", f"adapt.steps={args.adapt_steps}",
                   "--precision", args.precision, "--chunk", str(args.chunk), "--out", str(work / "runs"),
                   *(["--compile"] if args.compile else []),
                   # disney's k is the one for 1024 px (18 W+ codes); other sizes take their reference default
                   "--layers", str(Adapt.default_layer_k(2 * int(math.log2(args.size)) - 2))]
        start = time.perf_counter()
        code = ipl(command)
        wall = time.perf_counter() - start
        if code != 0:
            print(f"ipl adapt failed with exit code {code}", file=sys.stderr)
            return code
        run = RunDir.open(next((work / "runs").iterdir()))
        log = run.read_log()
        seconds = {stage: [r["seconds"] for r in log if r["stage"] == stage] for stage in ("mapper", "adapt")}
        median = {stage: statistics.median(s[1:] or s) for stage, s in seconds.items()}
        remaining = sum((PAPER_STEPS - len(s)) * median[stage] for stage, s in seconds.items())
        result = {
            "size": args.size,
            "device": args.device,
            "precision": args.precision,
            "chunk": args.chunk,
            "compiled": args.compile,
            "kernels": os.environ.get("IPL_KERNELS", "auto"),
            "steps": {stage: len(s) for stage, s in seconds.items()},
            "wall_s": round(wall, 1),
            "median_step_s": {stage: round(m, 4) for stage, m in median.items()},
            "projected_300_300_s": round(wall + remaining, 1),
            "projected": remaining > 0,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
            "final_loss": {stage: next(r["loss"] for r in reversed(log) if r["stage"] == stage) for stage in seconds},
        }
        if args.device.startswith("cuda"):
            result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
            result["peak_cuda_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1024**3, 2)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
