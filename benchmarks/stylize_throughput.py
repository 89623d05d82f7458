"""Time `ipl stylize` end to end and record photos per second in RESULTS.md.

Two cases, both through the real command line (real dlib detection and FFHQ alignment,
real files written):

    tiny: `--smoke`: tiny random e4e (64 px input) and tiny 32 px generators.
    256:  a full-size e4e (IR-SE50, 256 px input, 14 styles) with random weights, saved in
          the official checkpoint layout and passed with --weights, its 256 px config-f
          decoder, and one adapted 256 px generator (random, passed with --generator).

The photos are copies of `skimage.data.astronaut()` (512x512, one face), shifted and
mirrored so the detector works on distinct pictures. The first run of each case is a
warm-up (imports, dlib model load); the reported figure is the median of the timed runs.

    python benchmarks/stylize_throughput.py                  # both cases, writes RESULTS.md
    python benchmarks/stylize_throughput.py --case tiny --photos 8 --no-write
    python benchmarks/stylize_throughput.py --case 256 --precision bf16   # autocast, as `ipl stylize --precision`
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_photos(folder: Path, count: int) -> None:
    """`count` distinct 512x512 face photos: the astronaut, rolled and mirrored."""
    import numpy as np
    from PIL import Image
    from skimage import data

    base = data.astronaut()
    folder.mkdir(parents=True)
    for i in range(count):
        picture = np.roll(base, shift=(i % 5) * 7, axis=1)
        if i % 2:
            picture = picture[:, ::-1]
        Image.fromarray(np.ascontiguousarray(picture)).save(folder / f"photo{i:03d}.jpg", quality=92)


def make_models(folder: Path, size: int = 256) -> tuple[Path, Path]:
    """A full-size random e4e checkpoint for a `size` px config-f generator, and one target generator."""
    import torch

    from ipltool.models.encoders import Encoder4Editing, save_checkpoint
    from ipltool.models.stylegan2 import GeneratorConfig, build_generator, generator_checkpoint

    config = GeneratorConfig(size=size, channel_multiplier=2)
    decoder = build_generator(config, seed=0, noise_strength=0.1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = Encoder4Editing(n_styles=decoder.n_latent, style_dim=512, input_size=256)
        for block in encoder.styles:  # keep random codes near the average, like a trained encoder
            block.linear.weight.data.mul_(0.01)
    weights = folder / f"e4e-{size}-random.pt"
    save_checkpoint(weights, encoder, decoder, latent_avg=decoder.mean_latent(4096)[0])
    target = folder / f"target-{size}-random.pt"
    torch.save(generator_checkpoint(build_generator(config, seed=1, noise_strength=0.1)), target)
    return weights, target


def run_case(case: str, photos: int, repeats: int, batch: int, precision: str = "fp32") -> dict:
    """Run the command `repeats + 1` times on a fresh folder at `precision`; returns the timings."""
    from ipltool.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        make_photos(tmp_path / "photos", photos)
        if case == "tiny":
            extra = ["--smoke", "--domain", "disney"]
        else:
            weights, target = make_models(tmp_path, 256)
            extra = ["--weights", str(weights), "--generator", str(target)]
        seconds = []
        for run in range(repeats + 1):
            out = tmp_path / f"out{run}"
            args = ["--quiet", "--device", "cpu", "stylize", str(tmp_path / "photos"), "--out", str(out), "--batch", str(batch),
                    "--precision", precision, *extra]
            start = time.perf_counter()
            code = main(args)
            elapsed = time.perf_counter() - start
            if code != 0:
                raise SystemExit(f"ipl stylize failed with exit code {code}")
            if run:  # the first run pays for imports and model loading
                seconds.append(elapsed)
    median = statistics.median(seconds)
    return {"case": case, "precision": precision, "photos": photos, "batch": batch, "seconds": [round(s, 2) for s in seconds], "photos_per_second": round(photos / median, 3)}


def write_results(results: list[dict], command: str) -> Path:
    """Append a dated section to benchmarks/RESULTS.md."""
    import torch

    lines = [
        f"\n## Stylize throughput, {date.today().isoformat()}, cpu\n",
        f"Command: `{command}`\n",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}. "
        "Copies of skimage's astronaut (512x512, one face); real dlib detection and alignment; "
        "every output file written. Time per run includes model loading.\n",
        "| case | precision | photos | batch | seconds per run | photos/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['case']} | {r['precision']} | {r['photos']} | {r['batch']} | {', '.join(map(str, r['seconds']))} | {r['photos_per_second']} |")
    path = HERE / "RESULTS.md"
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["tiny", "256"], action="append", help="default: both")
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], action="append", help="default: fp32")
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    args = parser.parse_args()
    results = [run_case(case, args.photos, args.repeats, args.batch, precision)
               for case in (args.case or ["tiny", "256"]) for precision in (args.precision or ["fp32"])]
    print(json.dumps(results, indent=2))
    if not args.no_write:
        command = f"python benchmarks/stylize_throughput.py --photos {args.photos} --repeats {args.repeats} --batch {args.batch}" + "".join(
            f" --case {c}" for c in args.case or []) + "".join(f" --precision {p}" for p in args.precision or [])
        print(f"written to {write_results(results, command)}")


if __name__ == "__main__":
    main()
