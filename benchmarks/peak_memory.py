"""Peak memory of IPL's training steps with full-size networks: what a GPU would have to hold, measured on any machine.

Each case (stage, size, precision, `--chunk`) runs `train_steps.run_case` in a fresh
subprocess: config-f StyleGAN2 and the full ViT-B/32 with random weights, stage 1 at
batch 32, stage 2 at batch 2 with the layer choice on its batch of 8.

On a CPU the figure is the peak of the bytes held by live tensors, counted op by op (a
`TorchDispatchMode` that follows every tensor storage from its creation to its release):
the same tensors a GPU allocator would hold for the same arithmetic, without its
cache, cuDNN's workspaces or the CUDA context. Stage 2 also reports its peak inside the
layer choice and outside it. On a GPU it reads the allocator's own peaks (allocated and
reserved).

CPU-only paths count here and not on a GPU: CLIP's bf16 weight copy (about 0.25 GB, bf16
only), channels-last activations (same sizes) and upsampling by phases (four outputs
written into one, same size).

    python benchmarks/peak_memory.py --size 1024 --precision fp32 --precision bf16 --chunk 8 --chunk 4 --chunk 2
    python benchmarks/peak_memory.py --size 64 --case stage2 --chunk 8 --no-write         # quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import weakref
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def tensor_tracker():
    """A dispatch mode that keeps the peak of live tensor bytes, overall and per `phase`."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.weak import WeakIdKeyDictionary

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = WeakIdKeyDictionary()  # storage -> bytes, while it lives
            self.live = 0
            self.peaks: dict[str, int] = {}
            self.phase = "setup"

        def _released(self, size: int) -> None:
            self.live -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    if storage not in self.seen:  # views and in-place results share a counted storage
                        size = storage.nbytes()
                        self.seen[storage] = size
                        weakref.finalize(storage, self._released, size)
                        self.live += size
                        if self.live > self.peaks.get(self.phase, 0):
                            self.peaks[self.phase] = self.live
            return out

    return Tracker()


def run_one(case: str, size: int, precision: str, chunk: int, steps: int, device: str) -> dict:
    """One case in this process: its peak memory in GiB (by phase on a CPU) and its seconds per step."""
    import torch

    import train_steps
    from ipltool.train import stage2

    gib = 2**30
    if device == "cuda":
        started = time.perf_counter()
        result = train_steps.run_case(case, size, steps, device, chunk, precision)
        return {
            "case": case, "size": size, "precision": precision, "chunk": chunk, "device": torch.cuda.get_device_name(0),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / gib, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2),
            "seconds": result["seconds"], "wall_s": round(time.perf_counter() - started, 1),
        }
    tracker = tensor_tracker()
    real = stage2.layer_scores

    def in_phase(*args, **kwargs):
        tracker.phase = "layer choice"
        try:
            return real(*args, **kwargs)
        finally:
            tracker.phase = "step"

    stage2.layer_scores = in_phase
    started = time.perf_counter()
    try:
        with tracker:
            result = train_steps.run_case(case, size, steps, device, chunk, precision)
    finally:
        stage2.layer_scores = real
    return {
        "case": case, "size": size, "precision": precision, "chunk": chunk, "device": "cpu",
        "peak_tensors_gib": round(max(tracker.peaks.values()) / gib, 2),
        "by_phase_gib": {phase: round(peak / gib, 2) for phase, peak in tracker.peaks.items()},
        "peak_rss_gb": result["peak_rss_gb"],
        "seconds": result["seconds"], "wall_s": round(time.perf_counter() - started, 1),
    }


def write_results(results: list[dict], command: str) -> Path:
    """Append a dated section with the figures to benchmarks/RESULTS.md."""
    gpu = results[0]["device"] != "cpu"
    lines = [
        f"## Peak memory of the training steps, {date.today().isoformat()}, {results[0]['device']}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, Python {platform.python_version()}. Config-f StyleGAN2 and the full ViT-B/32, random weights; "
        "stage 1 batch 32, stage 2 batch 2 with the layer choice on 8.",
        "",
    ]
    if gpu:
        lines += ["| case | size | precision | --chunk | peak allocated | peak reserved | s/step |", "|---|---|---|---|---|---|---|"]
    else:
        lines += ["| case | size | precision | --chunk | peak tensors | in the layer choice | rest of the step | peak RSS | s/step |",
                  "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['case']} | {r['size']} | {r['precision']} | {r['chunk']} |"
        if "error" in r:
            lines.append(f"{head} {r['error']} |" + " |" * (2 if gpu else 4))
        elif gpu:
            lines.append(f"{head} {r['peak_allocated_gib']} GiB | {r['peak_reserved_gib']} GiB | {r['seconds'][-1]} |")
        else:
            phases = r["by_phase_gib"]
            choice = f"{phases['layer choice']} GiB" if "layer choice" in phases else "-"
            rest = f"{max(phases.get('step', 0), phases.get('setup', 0))} GiB"
            lines.append(f"{head} {r['peak_tensors_gib']} GiB | {choice} | {rest} | {r['peak_rss_gb']} GB | {r['seconds'][-1]} |")
    lines += ["", ""]
    path = HERE / "RESULTS.md"
    path.write_text(path.read_text() + "\n".join(lines))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=["stage1", "stage2"], help="repeatable; default both")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--precision", action="append", choices=["fp32", "bf16", "fp16"], help="repeatable; default fp32")
    parser.add_argument("--chunk", action="append", type=int, help="repeatable (`ipl adapt --chunk`); default 8. Stage 1 runs at the first only")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a single case, in this process
    parser.add_argument("--no-write", action="store_true", help="print the figures without touching RESULTS.md")
    args = parser.parse_args()
    cases, precisions, chunks = args.case or ["stage1", "stage2"], args.precision or ["fp32"], args.chunk or [8]
    if args.one:
        print(json.dumps(run_one(cases[0], args.size, precisions[0], chunks[0], args.steps, args.device)))
        return
    results = []
    for case in cases:
        for precision in precisions:
            # Stage 1's chunk only sets its no-grad renders; one value tells its peak.
            for chunk in chunks if case == "stage2" else chunks[:1]:
                cmd = [sys.executable, __file__, "--one", "--case", case, "--size", str(args.size), "--precision", precision,
                       "--chunk", str(chunk), "--steps", str(args.steps), "--device", args.device]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode == 0:
                    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
                else:  # e.g. killed for memory: recorded, the others go on
                    tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
                    results.append({"case": case, "size": args.size, "precision": precision, "chunk": chunk, "device": args.device,
                                    "error": f"failed: {tail[:120]}"})
                print(json.dumps(results[-1]), flush=True)
    if not args.no_write:
        command = "python benchmarks/peak_memory.py" + "".join(
            [f" --size {args.size}", f" --steps {args.steps}", f" --device {args.device}"]
            + [f" --case {c}" for c in cases] + [f" --precision {p}" for p in precisions] + [f" --chunk {c}" for c in chunks]
        )
        print(f"written to {write_results(results, command)}")


if __name__ == "__main__":
    main()
