"""GPU speed matrix: native vs compiled kernels, fp32 vs bf16, at 1024 px (config-f, CLIP ViT-B/32).

Every cell runs in its own subprocess with `IPL_KERNELS` set to `native` or `cuda`. Both
are strict (`cuda` fails rather than falling back), so a failed kernel build can never
pass for a native figure. Peak GPU memory is per cell.

    ops      forward + backward of upfirdn2d and the fused bias + leaky ReLU on config-f
             shapes (ms per call)
    stage1   one mapper step, batch 32 (s/step)
    stage2   one adaptation step, batch 2, adaptive layer choice with k 12 (s/step)
    stylize  `ipl stylize --no-align` over copies of a 512 px face: a full-size e4e
             (IR-SE50) with its decoder and one adapted generator (images/s, load included)

All networks have random weights: they do the same arithmetic as pretrained ones.

    python benchmarks/gpu_speed.py                  # the whole matrix on cuda; appends to RESULTS.md
    python benchmarks/gpu_speed.py --cell stage2 --kernels cuda --precision bf16   # one cell, prints JSON
    python benchmarks/gpu_speed.py --device cpu --size 64 --kernels native --steps 2 --photos 4 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CELLS = ("ops", "stage1", "stage2", "stylize")
# (label, channels, resolution, up, down, pad, kernel gain) of upfirdn2d calls config-f makes
# at 1024 px: the blur after each 2x transposed convolution, the RGB skip's 2x upsampling,
# and an encoder's 2x downsampling.
UPFIRDN2D_CASES = [
    ("blur 512ch 33px", 512, 33, 1, 1, (1, 1), 4),
    ("blur 128ch 257px", 128, 257, 1, 1, (1, 1), 4),
    ("blur 32ch 1025px", 32, 1025, 1, 1, (1, 1), 4),
    ("rgb up2 3ch 512px", 3, 512, 2, 1, (2, 1), 4),
    ("down2 64ch 256px", 64, 256, 1, 2, (1, 1), 1),
]
BIAS_ACT_CASES = [("mapping 512", (64, 512)), ("act 512ch 32px", (512, 32, 32)), ("act 64ch 512px", (64, 512, 512)), ("act 32ch 1024px", (32, 1024, 1024))]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_gpu_gb(device: str) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 1024**3, 2) if device.startswith("cuda") else None


def _time_ms(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (and, for the compiled kernels, their import)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 3)


def run_ops(device: str, precision: str, repeats: int, batch: int = 2) -> dict:
    """Milliseconds per forward + backward of each op on config-f shapes."""
    import torch

    from ipltool.kernels.fused_act import fused_leaky_relu
    from ipltool.kernels.upfirdn2d import upfirdn2d

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0], device=device)
    blur = taps[:, None] * taps[None, :] / 64
    figures = {}
    for label, channels, res, up, down, pad, gain in UPFIRDN2D_CASES:
        x = torch.randn(batch, channels, res, res, device=device, dtype=dtype, requires_grad=True)

        def step(x=x, up=up, down=down, pad=pad, kernel=blur * gain):
            y = upfirdn2d(x, kernel, up=up, down=down, pad=pad)
            y.backward(torch.ones_like(y))

        figures[f"upfirdn2d {label}"] = _time_ms(step, device, repeats)
    for label, shape in BIAS_ACT_CASES:
        x = torch.randn(batch if len(shape) > 2 else 1, *shape, device=device, dtype=dtype).squeeze(0).requires_grad_(True)
        bias = torch.zeros(x.shape[1], device=device, requires_grad=True)

        def step(x=x, bias=bias):
            y = fused_leaky_relu(x, bias)
            y.backward(torch.ones_like(y))

        figures[f"bias_act {label}"] = _time_ms(step, device, repeats)
    return {"figures_ms": figures, "peak_gpu_gb": _peak_gpu_gb(device)}


def run_training(cell: str, size: int, steps: int, device: str, precision: str) -> dict:
    """Median seconds per stage-1 or stage-2 step (train_steps.py's cases at this size)."""
    import train_steps

    result = train_steps.run_case(cell, size, steps, device, chunk=8, precision=precision)
    return {"median_s": result["median_s"], "seconds": result["seconds"], "peak_gpu_gb": result.get("peak_cuda_gb")}


def run_stylize(size: int, photos: int, device: str, precision: str, batch: int) -> dict:
    """Images per second of `ipl stylize --no-align` (median of two timed runs after a warm-up)."""
    import stylize_throughput

    from ipltool.cli import main

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        stylize_throughput.make_photos(tmp_path / "photos", photos)
        weights, target = stylize_throughput.make_models(tmp_path, size)
        seconds = []
        for run in range(3):
            args = [
                "--quiet", "--device", device, "stylize", str(tmp_path / "photos"), "--no-align",
                "--weights", str(weights), "--generator", str(target), "--batch", str(batch),
                "--precision", precision, "--out", str(tmp_path / f"out{run}"),
            ]
            start = time.perf_counter()
            if main(args) != 0:
                raise SystemExit("ipl stylize failed")
            _sync(device)
            if run:
                seconds.append(time.perf_counter() - start)
    return {"images_per_s": round(photos / statistics.median(seconds), 2), "seconds": [round(s, 2) for s in seconds], "peak_gpu_gb": _peak_gpu_gb(device)}


def run_cell(args: argparse.Namespace) -> dict:
    """One cell of the matrix, in this process (IPL_KERNELS is already set)."""
    if args.cell == "ops":
        result = run_ops(args.device, args.precision, args.repeats)
    elif args.cell == "stylize":
        result = run_stylize(args.size, args.photos, args.device, args.precision, args.batch)
    else:
        result = run_training(args.cell, args.size, args.steps, args.device, args.precision)
    return {"cell": args.cell, "kernels": os.environ["IPL_KERNELS"], "precision": args.precision, "size": args.size, **result}


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (torch {torch.__version__})"


def write_results(results: list[dict], command: str, device: str) -> Path:
    """Append a dated section with the matrix to benchmarks/RESULTS.md."""
    lines = [
        f"\n## GPU speed matrix, {date.today().isoformat()}, {_device_name(device)}\n",
        f"Command: `{command}`\n",
        "Random weights; config-f StyleGAN2 and CLIP ViT-B/32 at full size. Each cell in its own process; "
        "`IPL_KERNELS` strict (native or cuda). Peak memory is `torch.cuda.max_memory_allocated`.\n",
        "| cell | kernels | precision | figure | peak GPU memory |",
        "|---|---|---|---|---|",
    ]
    ops = []
    for r in results:
        if r["cell"] == "ops":
            ops.append(r)
            continue
        figure = f"{r['images_per_s']} images/s" if r["cell"] == "stylize" else f"{r['median_s']} s/step"
        lines.append(f"| {r['cell']} @ {r['size']} | {r['kernels']} | {r['precision']} | {figure} | {r['peak_gpu_gb']} GB |")
    if ops:
        header = ["op (fwd + bwd, ms)"] + [f"{r['kernels']} {r['precision']}" for r in ops]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in ops[0]["figures_ms"]:
            lines.append("| " + " | ".join([name] + [str(r["figures_ms"][name]) for r in ops]) + " |")
    path = HERE / "RESULTS.md"
    path.write_text(path.read_text() + "\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=CELLS, action="append", help="default: all (with --kernels/--precision: one cell here)")
    parser.add_argument("--kernels", choices=["native", "cuda"], action="append", help="default: both")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], action="append", help="default: fp32 and bf16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="training steps per cell (the first is not counted)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per op")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="stylize batch")
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)  # one cell, in this process
    args = parser.parse_args()
    if args.inner:
        args.cell, args.precision = args.cell[0], args.precision[0]
        print(json.dumps(run_cell(args)))
        return
    results = []
    for cell in args.cell or CELLS:
        for precision in args.precision or ["fp32", "bf16"]:
            for kernels in args.kernels or ["native", "cuda"]:
                cmd = [sys.executable, __file__, "--inner", "--cell", cell, "--precision", precision,
                       "--device", args.device, "--size", str(args.size), "--steps", str(args.steps),
                       "--repeats", str(args.repeats), "--photos", str(args.photos), "--batch", str(args.batch)]
                env = {**os.environ, "IPL_KERNELS": kernels}
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    print(f"{cell} {kernels} {precision}: FAILED\n{done.stderr[-2000:]}", flush=True)
                    continue
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    if results and not args.no_write:
        command = "python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:])
        print(f"written to {write_results(results, command.strip(), args.device)}")


if __name__ == "__main__":
    main()
