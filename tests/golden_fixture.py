"""The seeded random-weight fixture shared by `tools/make_goldens.py` and `tests/test_goldens.py`.

Both sides rebuild it from the seeds and settings here: the script writes it to the
files the authors' code loads (a rosinality `{"g_ema": ...}` checkpoint and an OpenAI
CLIP state dict) and runs their training on it; the tests build the same networks in
memory and run ipltool's steps. The goldens (`tests/data/goldens.json`) hold only
numbers: losses, chosen layers, text directions, and summaries of gradients and
weights (`summary`).

The fixture is a 64 px StyleGAN2 with config-f widths (StyleGAN-NADA's `SG2Generator`
always builds channel multiplier 2) and a full-size ViT-B/32 (QuickGELU, as OpenAI's)
with random weights rounded to float16, because OpenAI's `clip.load` passes every
weight through float16 on its way in (its `convert_weights`). `logit_scale` is set to
ln 100, the value of the trained OpenAI models, so the logits have their usual scale.
"""

from __future__ import annotations

import math

import torch

from ipltool.domain import Domain, parse_domain
from ipltool.models.clip import Clip, PromptEncoder, load_clip
from ipltool.models.stylegan2 import Generator, GeneratorConfig, build_generator

GENERATOR = GeneratorConfig(size=64, channel_multiplier=2)  # style_dim 512, n_mlp 8, as both codes hard-code
GENERATOR_SEED = 0
# Non-zero noise strengths: with the init's zeros G_s(w) == G_t(w) on the first step and
# IPL's image direction is 0 / 0.
NOISE_STRENGTH = 0.1
CLIP_ARCH = "ViT-B-32-quickgelu"
CLIP_SEED = 0
LOGIT_SCALE = 100.0

SOURCE, TARGET, CTX_INIT = "photo", "disney", "a photo of a"
# The authors' flags for each setting are in tools/make_goldens.py; the values are the
# papers' defaults except the batch sizes and step counts, which are kept small.
STAGE1 = {"seed": 3, "batch": 4, "steps": 2, "lr": 0.05, "lambda_l": 1.0, "lambda_src": 0.0}
STAGE2 = {"seed": 2, "batch": 2, "steps": 2, "lr": 0.002, "ema": 0.99, "n_sample": 4,
          "auto_layer_k": 6, "auto_layer_iters": 1, "auto_layer_batch": 4}
# StyleGAN-NADA's train.py seeds with 2 and renders its first sample grid after step 1,
# drawing from the same stream, so one step is compared.
NADA = {"seed": 2, "steps": 1, "lambda_globals": (0.0, 1.0)}

#: Flat positions probed by `summary`.
PROBES = 8


def generator() -> Generator:
    """The frozen source generator G_s of the fixture."""
    return build_generator(GENERATOR, seed=GENERATOR_SEED, noise_strength=NOISE_STRENGTH).eval().requires_grad_(False)


def clip() -> Clip:
    """The fixture's random ViT-B/32, every float rounded through float16, logit scale 100."""
    model = load_clip(CLIP_ARCH, None, seed=CLIP_SEED).model
    with torch.no_grad():
        model.logit_scale.fill_(math.log(LOGIT_SCALE))
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    return Clip(model, CLIP_ARCH)


def openai_state_dict(model: Clip) -> dict[str, torch.Tensor]:
    """The CLIP weights in OpenAI's layout, which `clip.load(path)` reads (open_clip kept its key names)."""
    return {key: value.detach().clone() for key, value in model.model.state_dict().items()}


def domain(method: str = "ipl", lambda_global: float = 0.0) -> Domain:
    """The domain of the golden runs: photo -> disney, "a photo of a", the settings above."""
    text = f"""
name = "golden"
source = "{SOURCE}"
target = "{TARGET}"
generator = "tiny"
ctx_init = "{CTX_INIT}"
[loss]
lambda_l = {STAGE1["lambda_l"]}
lambda_src = {STAGE1["lambda_src"]}
lambda_global = {lambda_global}
[mapper]
steps = {STAGE1["steps"]}
batch = {STAGE1["batch"]}
lr = {STAGE1["lr"]}
seed = {STAGE1["seed"]}
[adapt]
method = "{method}"
steps = {STAGE2["steps"] if method == "ipl" else NADA["steps"]}
batch = {STAGE2["batch"]}
lr = {STAGE2["lr"]}
ema = {STAGE2["ema"]}
n_sample = {STAGE2["n_sample"]}
auto_layer_k = {STAGE2["auto_layer_k"]}
auto_layer_iters = {STAGE2["auto_layer_iters"]}
auto_layer_batch = {STAGE2["auto_layer_batch"]}
seed = {STAGE2["seed"] if method == "ipl" else NADA["seed"]}
"""
    return parse_domain(text, "golden.toml")


def prompts(model: Clip) -> PromptEncoder:
    """The learned-prompt encoder of the fixture's CLIP for `CTX_INIT`."""
    return PromptEncoder(model, CTX_INIT)


def summary(tensor: torch.Tensor) -> dict:
    """A compact fingerprint of a tensor: shape, L2 norm, sum and `PROBES` evenly spaced values."""
    flat = tensor.detach().reshape(-1).double().cpu()
    n, k = flat.numel(), min(PROBES, flat.numel())
    index = torch.tensor([i * (n - 1) // max(k - 1, 1) for i in range(k)])
    return {
        "shape": list(tensor.shape),
        "norm": flat.norm().item(),
        "sum": flat.sum().item(),
        "probe": flat[index].tolist(),
    }
