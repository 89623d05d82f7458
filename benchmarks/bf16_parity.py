"""bf16 against fp32: the same training steps from the same seed, loss by loss.

Runs each case of `train_steps.py` (config-f StyleGAN2 with random weights, full-size
random ViT-B/32) twice in fresh subprocesses, once per precision, and compares the
per-step losses. The acceptance of issue 18: every bf16 loss finite and within 1 % of the
fp32 loss of the same step, over 20 steps, for stage 1 and stage 2 at 64 and 256 px.

    python benchmarks/bf16_parity.py                                 # every case, 20 steps, appends to RESULTS.md
    python benchmarks/bf16_parity.py --case stage2 --size 64 --steps 5 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [("stage1", 64), ("stage2", 64), ("stage1", 256), ("stage2", 256)]
TOLERANCE = 0.01


def run(case: str, size: int, steps: int, precision: str) -> dict:
    """One case at one precision through `train_steps.py --case`, in a subprocess of its own."""
    cmd = [sys.executable, str(HERE / "train_steps.py"), "--case", case, "--size", str(size), "--steps", str(steps),
           "--precision", precision, "--no-write"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(fp32: list[float], bf16: list[float]) -> dict:
    """Relative difference of each step's bf16 loss from its fp32 loss; NaN/inf counts as a failure."""
    relative = [abs(b - f) / abs(f) if math.isfinite(b) and f != 0 else math.inf for f, b in zip(fp32, bf16)]
    worst = max(relative)
    return {"max_rel": worst, "worst_step": relative.index(worst) + 1, "finite": all(math.isfinite(b) for b in bf16),
            "ok": worst <= TOLERANCE and len(fp32) == len(bf16)}


def write_results(rows: list[dict], command: str) -> Path:
    """Append a dated section with the comparison to RESULTS.md."""
    lines = [f"## bf16 against fp32, training losses, {date.today().isoformat()}, cpu", "", f"Command: `{command}`", "",
             "Same seed, same random weights (config-f StyleGAN2, full-size ViT-B/32); each precision in a fresh process.", "",
             "| case | size | steps | max relative loss difference | at step | all bf16 finite | within 1 % | s/step fp32 | s/step bf16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['size']} | {r['steps']} | {r['max_rel'] * 100:.3f} % | {r['worst_step']} | "
                     f"{'yes' if r['finite'] else 'NO'} | {'yes' if r['ok'] else 'NO'} | {r['fp32_s']} | {r['bf16_s']} |")
    lines += [""]
    for r in rows:
        lines.append(f"- {r['case']}@{r['size']} fp32 losses: {', '.join(f'{x:.5f}' for x in r['fp32'])}")
        lines.append(f"- {r['case']}@{r['size']} bf16 losses: {', '.join(f'{x:.5f}' for x in r['bf16'])}")
        lines.append(f"- {r['case']}@{r['size']} relative difference per step: {', '.join(f'{abs(b - f) / abs(f) * 100:.2f} %' for f, b in zip(r['fp32'], r['bf16']))}")
        if "other_layers_at" in r:
            lines.append(f"- {r['case']}@{r['size']} steps whose layer choice differed in bf16: {r['other_layers_at'] or 'none'}")
            lines.append(f"- {r['case']}@{r['size']} bf16 layer choices confirmed in fp32: {r['fp32_confirmations']} of {r['steps']}; "
                         f"mean s/step fp32 {r['fp32_mean_s']}, bf16 {r['bf16_mean_s']}")
    lines += ["", ""]
    path = HERE / "RESULTS.md"
    path.write_text(path.read_text() + "\n".join(lines))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["stage1", "stage2"], help="one case (with --size); default: all four")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-write", action="store_true", help="print the comparison without touching RESULTS.md")
    args = parser.parse_args()
    cases = [(args.case, args.size)] if args.case else CASES
    rows = []
    for case, size in cases:
        fp32, bf16 = (run(case, size, args.steps, p) for p in ("fp32", "bf16"))
        row = {"case": case, "size": size, "steps": args.steps, "fp32": fp32["losses"], "bf16": bf16["losses"],
               "fp32_s": fp32["median_s"], "bf16_s": bf16["median_s"], **compare(fp32["losses"], bf16["losses"])}
        if "layers" in fp32:  # stage 2: steps whose layer choice picked other layers in bf16 (a discrete decision)
            row["other_layers_at"] = [i + 1 for i, (a, b) in enumerate(zip(fp32["layers"], bf16["layers"])) if sorted(a) != sorted(b)]
            # Steps whose choice bf16 could not make alone cost an fp32 pass: the mean shows it, the median may not.
            row["fp32_confirmations"] = bf16["fp32_confirmations"]
            row["fp32_mean_s"], row["bf16_mean_s"] = (round(sum(r["seconds"][1:]) / max(len(r["seconds"]) - 1, 1), 3) for r in (fp32, bf16))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_write:
        command = "python benchmarks/bf16_parity.py" + (f" --case {args.case} --size {args.size}" if args.case else "") + f" --steps {args.steps}"
        print(f"written to {write_results(rows, command)}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
