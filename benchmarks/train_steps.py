"""Time IPL training steps at the sizes of docs/method.md §3 and record them in RESULTS.md.

Each case runs in a fresh subprocess so its peak memory is its own:

    stage 1: one mapper step, batch 32 (mlp mapper)
    stage 2: one adaptation step, batch 2, adaptive layer choice on (8 latents, 1 iteration)

on a randomly initialised StyleGAN2 (config-f channels, 512-d W) at 64 and 256 px with a
randomly initialised full-size CLIP ViT-B/32. Random weights time the same arithmetic
as pretrained ones. The first step of each case is left out of the median (it also
encodes the fixed text features once per run).

    python benchmarks/train_steps.py                 # every case, writes benchmarks/RESULTS.md
    python benchmarks/train_steps.py --case stage1 --size 64 --steps 4   # one case, prints JSON
    python benchmarks/train_steps.py --device cuda --precision bf16      # autocast (see ipltool.precision)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [("stage1", 64), ("stage1", 256), ("stage2", 64), ("stage2", 256)]
# The authors' code on these machines (docs/method.md §3); stage 1 at 256 was killed at 22.6 GB.
REFERENCE = {("stage1", 64): 27.4, ("stage2", 64): 11.0, ("stage2", 256): 52.1}
DOMAIN = """
name = "bench"
source = "photo"
target = "disney"
generator = "tiny"
[mapper]
batch = 32
[adapt]
batch = 2
auto_layer_iters = 1
auto_layer_batch = 8
"""


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_case(case: str, size: int, steps: int, device: str, chunk: int, precision: str = "fp32") -> dict:
    """Run `steps` steps of one case here, at `precision`, and return its timings."""
    from ipltool.allocator import apply_malloc_choice

    malloc = apply_malloc_choice()  # as `ipl` does before any tensor exists: IPL_MALLOC=reuse keeps freed blocks
    import torch

    from ipltool.domain import parse_domain
    from ipltool.models.clip import PromptEncoder, load_clip
    from ipltool.models.stylegan2 import GeneratorConfig, build_generator
    from ipltool.precision import Precision
    from ipltool.train.stage1 import train_mapper
    from ipltool.train.stage2 import clip_terms, stage2_step, start_stage2
    from ipltool import registry

    amp = Precision.of(precision, device)  # refuses e.g. bf16 on a GPU without it, before any work
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # Noise strengths of 0.1, like a trained model: with 0, G_t (a copy of G_s) renders the very same
    # pictures at step 0 and the image directions have nothing to point along.
    source = build_generator(GeneratorConfig(size=size), seed=0, noise_strength=0.1).to(device).eval().requires_grad_(False)
    clip = load_clip("ViT-B-32", None, device=device)
    domain = parse_domain(DOMAIN, "bench.toml").with_overrides(
        {"mapper.steps": steps, "adapt.steps": steps, "adapt.auto_layer_k": int(2 * source.n_latent / 3)}
    )
    prompts = PromptEncoder(clip, domain.ctx_init)
    torch.manual_seed(0)
    mapper = registry.build_mapper("mlp", prompts.n_ctx, prompts.dim, source.style_dim).to(device)
    times: list[float] = []
    last = time.perf_counter()
    losses: list[float] = []
    layers: list[list[int] | None] = []  # stage 2: the W+ indices the layer choice picked at each step

    def tick(step: int, terms: dict) -> None:
        nonlocal last
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last)
        losses.append(terms["loss"])
        layers.append(terms.get("layers"))
        last = now

    if case == "stage1":
        train_mapper(mapper, source, prompts, domain, chunk=chunk, on_step=tick, precision=amp)
    else:
        from ipltool.train import stage2

        # Count the layer choices bf16/fp16 left to fp32 (`stage2.choose_layers` calls
        # `layer_scores` positionally, the precision sixth).
        layer_scores = stage2.layer_scores
        confirmations = 0

        def counted(*args, **kwargs):
            nonlocal confirmations
            confirmations += amp.reduced and args[5].name == "fp32"
            return layer_scores(*args, **kwargs)

        stage2.layer_scores = counted
        try:
            state = start_stage2(source, domain, amp, chunk)
            terms = clip_terms([(clip, 1.0)], domain)
            last = time.perf_counter()
            for _ in range(steps):
                tick(0, stage2_step(state, source, terms, domain, mapper, prompts))
        finally:
            stage2.layer_scores = layer_scores
    result = {
        "case": case,
        "size": size,
        "precision": amp.name,
        "batch": domain.mapper.batch if case == "stage1" else domain.adapt.batch,
        "steps": steps,
        "seconds": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times[1:] or times), 3),
        "peak_rss_gb": round(peak_rss_gb(), 2),
        "losses": losses,
        **({"layers": layers, "fp32_confirmations": confirmations} if case == "stage2" else {}),
        "threads": torch.get_num_threads(),
        "malloc": malloc,
    }
    if device == "cuda":
        result["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 2)
    return result


def write_results(results: list[dict], command: str, device: str, precision: str = "fp32") -> Path:
    """Append a dated section with the figures to benchmarks/RESULTS.md."""
    lines = [
        f"## Training steps, {date.today().isoformat()}, {device}" + (f", {precision}" if precision != "fp32" else ""),
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {results[0]['threads']}, "
        f"Python {platform.python_version()}, C heap: {results[0]['malloc']} (IPL_MALLOC). "
        "Random weights: StyleGAN2 config-f channels, CLIP ViT-B/32 full size.",
        "",
        "| case | size | batch | median s/step | authors' code s/step | speed-up | peak memory (RSS) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = REFERENCE.get((r["case"], r["size"]))
        ref_text = f"{ref}" if ref else ("killed at 22.6 GB" if r["case"] == "stage1" else "-")
        speedup = f"{ref / r['median_s']:.1f}x" if ref else "-"
        memory = f"{r['peak_rss_gb']} GB" + (f" (CUDA {r['peak_cuda_gb']} GB)" if "peak_cuda_gb" in r else "")
        lines.append(f"| {r['case']} | {r['size']} | {r['batch']} | {r['median_s']} | {ref_text} | {speedup} | {memory} |")
    lines += ["", "Per-step seconds: " + "; ".join(f"{r['case']}@{r['size']}: {r['seconds']}" for r in results), "", ""]
    path = HERE / "RESULTS.md"
    previous = path.read_text() if path.exists() else "# Benchmarks\n\nEach section: what was measured, the command, the figures.\n\n"
    path.write_text(previous + "\n".join(lines))
    return path


def main() -> None:
    from ipltool.precision import CHOICES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["stage1", "stage2"], help="run one case in this process and print JSON")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="steps per case (the first is not counted)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk", type=int, default=8, help="images rendered at once by stage 1 and the layer choice (`ipl adapt --chunk`)")
    parser.add_argument("--precision", default="fp32", choices=CHOICES, help="fp32 (default), bf16, fp16 or auto (autocast, as `ipl adapt --precision`)")
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.size, args.steps, args.device, args.chunk, args.precision)))
        return
    results = []
    for case, size in CASES:
        cmd = [sys.executable, __file__, "--case", case, "--size", str(size), "--steps", str(args.steps),
               "--device", args.device, "--chunk", str(args.chunk), "--precision", args.precision]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{case} @ {size}: {results[-1]['median_s']} s/step, peak {results[-1]['peak_rss_gb']} GB", flush=True)
    if not args.no_write:
        malloc = os.environ.get("IPL_MALLOC")
        command = (f"IPL_MALLOC={malloc} " if malloc else "") + "python benchmarks/train_steps.py" + "".join(
            f" --{k} {v}" for k, v in (("steps", args.steps), ("device", args.device), ("chunk", args.chunk), ("precision", args.precision))
        )
        print(f"written to {write_results(results, command, args.device, args.precision)}")


if __name__ == "__main__":
    main()
