"""How far bf16 moves the adaptive layer choice's scores from fp32, and which part of it does.

The layer choice (`ipltool.train.stage2.choose_layers`) scores each W+ index by
`mean |w - w0|` after one SGD step (lr 0.01) on w, then trains the top k. This script
computes those scores from identical weights, z and noise (config-f at `--size`, full-size
random ViT-B/32, batch 8, as `train_steps.py`), once in fp32 and once per variant that
keeps part of the work in fp32, and prints per draw:

- the largest relative error of a score;
- the largest error that can reorder layers: the relative error minus its mean over the
  indices (a common scale changes no ranking);
- the gap between the k-th and (k+1)-th fp32 score, and whether both picked the same layers.

    python benchmarks/layer_choice_scores.py                 # 256 px, draws 0 and 3
    python benchmarks/layer_choice_scores.py --size 64 --draws 0 1 2 3

Nothing is written; the figures of 2026-12-06 are in RESULTS.md ("Layer choice in bf16").
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from ipltool.domain import parse_domain
from ipltool.models.clip import load_clip
from ipltool.models.stylegan2 import GeneratorConfig, build_generator
from ipltool.precision import FP32, Precision
from ipltool.train import losses
from ipltool.train import stage2
from train_steps import DOMAIN

BATCH = 8


def _in_fp32(module: torch.nn.Module) -> None:
    """Run `module` without autocast, on float32 inputs (undone by `_restore`)."""
    forward = module.forward

    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return forward(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args), **kwargs)

    module.forward = run


def _restore(module: torch.nn.Module) -> None:
    module.__dict__.pop("forward", None)


def scores(source, trainable, terms, seed: int, generator: Precision, clip: Precision, fp32_blocks: int = 0):
    """The layer choice's scores for draw `seed`; the first `fp32_blocks` resolutions of `trainable` in fp32."""
    modules = [trainable.conv1, trainable.to_rgb1] if fp32_blocks else []
    modules += list(trainable.convs[: 2 * max(fp32_blocks - 1, 0)]) + list(trainable.to_rgbs[: max(fp32_blocks - 1, 0)])
    for module in modules:
        _in_fp32(module)
    torch.manual_seed(seed)
    z = torch.randn(BATCH, source.style_dim)
    with torch.no_grad():
        w0 = source.to_w_plus([source.mapping(z)])
    w = w0.clone().requires_grad_(True)
    noise = trainable.draw_noise(BATCH)
    start = time.perf_counter()
    with generator.autocast():
        images = trainable.synthesis(w, noise)
    loss = sum(t.weight * losses.global_clip_loss(stage2._features(t.clip, images, clip), t.target_label, t.clip.logit_scale) for t in terms)
    (grad,) = torch.autograd.grad(loss, [w])
    seconds = time.perf_counter() - start
    for module in modules:
        _restore(module)
    return (stage2.LAYER_CHOICE_LR * grad).abs().mean(-1).mean(0), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 3])
    args = parser.parse_args()
    bf16 = Precision.of("bf16", "cpu")
    source = build_generator(GeneratorConfig(size=args.size), seed=0, noise_strength=0.1).eval().requires_grad_(False)
    terms = stage2.clip_terms([(load_clip("ViT-B-32", None, device="cpu"), 1.0)], parse_domain(DOMAIN, "bench.toml"))
    trainable = copy.deepcopy(source)
    k = int(2 * source.n_latent / 3)
    variants = [
        ("all bf16", (bf16, bf16)),
        ("bf16 generator, fp32 CLIP", (bf16, FP32)),
        ("fp32 generator, bf16 CLIP", (FP32, bf16)),
        ("generator fp32 up to 32 px", (bf16, bf16, 4)),  # 4, 8, 16, 32 px
        ("generator fp32 up to 64 px", (bf16, bf16, 5)),
    ]
    for seed in args.draws:
        reference, reference_s = scores(source, trainable, terms, seed, FP32, FP32)
        ordered = reference.sort(descending=True).values
        gap = (ordered[k - 1] - ordered[k]) / ordered[k - 1]
        print(f"draw {seed}: all fp32 {reference_s:.1f} s, gap between score {k} and {k + 1}: {gap * 100:.2f} %", flush=True)
        for name, variant in variants:
            values, seconds = scores(source, trainable, terms, seed, *variant)
            relative = (values - reference) / reference
            same = set(values.topk(k).indices.tolist()) == set(reference.topk(k).indices.tolist())
            print(f"  {name:28s} {seconds:5.1f} s  max error {relative.abs().max() * 100:.2f} %  "
                  f"can reorder {(relative - relative.mean()).abs().max() * 100:.2f} %  same layers {same}", flush=True)


if __name__ == "__main__":
    main()
