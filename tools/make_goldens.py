"""Write `tests/data/goldens.json`: the authors' IPL and StyleGAN-NADA code run on the golden fixture.

Not run by CI, and it fetches nothing: point it at exports (git checkouts or unpacked
archives) of the pinned revisions below. The authors' code is called, never copied:

    python tools/make_goldens.py --ipl ~/src/IPL-Zero-Shot-Generative-Model-Adaptation \\
        --nada ~/src/StyleGAN-nada --clip ~/src/CLIP

It needs, besides ipltool's own dependencies, what the authors' code imports:
`ftfy` and `regex` (OpenAI's CLIP) and `torchvision`. It runs on the CPU in about a
minute. What the goldens hold, and how the tests compare them, is in
`docs/fidelity.md`.

The fixture (`tests/golden_fixture.py`: a seeded 64 px StyleGAN2 and a seeded
ViT-B/32) is written to a temporary folder as the files their code loads. Each code
base then runs its own `train(args)` in a subprocess of its own (both have top-level
packages named `model`, `op`, `criteria`, ...), with these run-time patches and no
others:

1. `torch.utils.cpp_extension.load` returns a stand-in: their `op` modules compile
   CUDA kernels at import, and on CPU tensors they take their own native code paths,
   which never touch the kernels.
2. "cuda" becomes the CPU: `Module.to`, `Tensor.to`, `Tensor.cuda` and `torch.load`'s
   `map_location` map a CUDA device to "cpu", and the `device` attributes their
   constructors hard-code are set to "cpu" after construction. `torch.load` also
   rewinds a file object first: `clip.load` reads its open file a second time, as a
   state dict, after the TorchScript attempt has moved the position. `Tensor.cpu`
   returns a copy, as it does for their CUDA tensors: `determine_opt_layers` builds the
   optimised codes from `initial_w_codes.cpu().numpy()`, and on the CPU (where `.cpu()`
   returns the tensor itself) the two would share memory, SGD would move both, and
   every layer would score 0.
3. `clip.load(name)` loads the fixture's ViT-B/32 file instead of downloading `name`
   (also for the RN50 their CLIPLoss loads for a texture loss that stays off).
4. OpenAI CLIP's `LayerNorm` normalises a copy of its input. On a GPU their float16
   model casts the input to float32 first, which is a copy; on the CPU the model is
   float32, the cast returns the tensor itself, and IPL's `text_encoder`, which writes
   each prompt's transformer output back into its input in place, then fails autograd's
   in-place check. The numbers are the same either way.
5. torchvision's `Resize` does not antialias unless asked to, as torchvision did for
   tensors until 0.17; the authors' READMEs pin torchvision 0.9 (IPL) and torch 1.7.1
   (NADA). Today's default antialiases, which for CLIP's bicubic upscaling means
   another kernel (a = -0.5 instead of -0.75). ipltool's `Clip.preprocess` follows the
   authors' versions.
6. Their `train` module's `save_images` writes nothing: the sample pictures are not
   part of the goldens, and NADA's call passes `range=`, which today's torchvision no
   longer takes.
7. When OpenCV is missing, an empty `cv2` module stands in (NADA's `file_utils` imports
   it for helpers these runs do not call).

Recording wraps their methods without changing what they compute: the stage-1 loss
(`CLIPLoss.global_clip_loss` with `is_contrastive`), each stage-2 loss and its terms
(`ZSSGAN.forward`, `CLIPLoss.clip_directional_loss`, `CLIPLoss.global_clip_loss`), the
chosen layers (`ZSSGAN.determine_opt_layers`), the text direction
(`CLIPLoss.target_direction`), and, at every `Adam.step`, the gradients and the
updated weights. The final weights come from the checkpoints their runs save.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "data" / "goldens.json"

#: The revisions the goldens were made from.
PINNED = {
    "ipl": ("Picsart-AI-Research/IPL-Zero-Shot-Generative-Model-Adaptation", "2c70ac3152c939db1cb89663038ccde6c9f6983c"),
    "nada": ("rinongal/StyleGAN-nada", "dc8406ae2173ad186f8f03f3cadf65e613ac9364"),
    "clip": ("openai/CLIP", "d05afc436d78f1c48dc0dbf8e5980a9d471f35f6"),
}


def _fixture():
    sys.path.insert(0, str(REPO / "tests"))
    import golden_fixture

    return golden_fixture


# ----------------------------------------------------------------------------
# The parent: fixture files, one subprocess per run, the merged file


def _revision(path: Path) -> str | None:
    """The checked-out commit of `path`, or None for an export without git metadata."""
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def _check_sources(paths: dict[str, Path], any_revision: bool) -> dict[str, str]:
    """Check each export looks like its project and is at the pinned commit; return the commits used."""
    marker = {"ipl": "train.py", "nada": "ZSSGAN/train.py", "clip": "clip/clip.py"}
    used = {}
    for key, path in paths.items():
        if not (path / marker[key]).is_file():
            sys.exit(f"error: {path} has no {marker[key]}: pass an export of {PINNED[key][0]}")
        commit = _revision(path)
        if commit is not None and commit != PINNED[key][1] and not any_revision:
            sys.exit(
                f"error: {path} is at {commit}, not the pinned {PINNED[key][1]} of {PINNED[key][0]}"
                " (check it out, or pass --any-revision and say so wherever the goldens are used)"
            )
        used[key] = commit or f"{PINNED[key][1]} (export without git metadata: assumed)"
    return used


def write_fixture(folder: Path, size: int | None = None) -> dict[str, str]:
    """Write the fixture's generator and CLIP files; return their paths.

    `size` (for benchmarks/authors_steps.py) builds the generator at that resolution with
    the fixture's seed, widths and noise strength; None keeps the fixture's own 64 px.
    """
    import dataclasses

    import torch

    from ipltool.models.stylegan2 import build_generator

    fx = _fixture()
    if size is None or size == fx.GENERATOR.size:
        generator = fx.generator()
    else:
        config = dataclasses.replace(fx.GENERATOR, size=size)
        generator = build_generator(config, seed=fx.GENERATOR_SEED, noise_strength=fx.NOISE_STRENGTH)
    generator_path, clip_path = folder / "generator.pt", folder / "clip-vit-b-32.pt"
    torch.save({"g_ema": generator.state_dict()}, generator_path)
    torch.save(fx.openai_state_dict(fx.clip()), clip_path)
    return {"generator": str(generator_path), "clip": str(clip_path)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ipl", type=Path, required=True, help=f"export of {PINNED['ipl'][0]}")
    parser.add_argument("--nada", type=Path, required=True, help=f"export of {PINNED['nada'][0]}")
    parser.add_argument("--clip", type=Path, required=True, help=f"export of {PINNED['clip'][0]} (its `clip` package)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the goldens go")
    parser.add_argument("--any-revision", action="store_true", help="accept exports at other commits than the pinned ones")
    args = parser.parse_args(argv)
    sources = {"ipl": args.ipl.resolve(), "nada": args.nada.resolve(), "clip": args.clip.resolve()}
    commits = _check_sources(sources, args.any_revision)

    import open_clip
    import torch

    fx = _fixture()
    result: dict = {
        "about": "numbers from the authors' code on tests/golden_fixture.py; made by tools/make_goldens.py, see docs/fidelity.md",
        "sources": {key: {"repository": PINNED[key][0], "commit": commits[key]} for key in PINNED},
        "made_with": {"torch": torch.__version__, "open_clip": open_clip.__version__, "python": sys.version.split()[0]},
    }
    with tempfile.TemporaryDirectory(prefix="ipl-goldens-") as tmp:
        folder = Path(tmp)
        files = write_fixture(folder)
        result["fixture"] = fixture_summary(fx)
        runs = [("ipl", "ipl", {})] + [
            (f"nada_global_{g:g}", "nada", {"lambda_global": g}) for g in fx.NADA["lambda_globals"]
        ]
        for name, code, options in runs:
            part = folder / f"{name}.json"
            job = {"code": code, "source": str(sources[code]), "clip_source": str(sources["clip"]),
                   "files": files, "work": str(folder / name), "options": options, "out": str(part)}
            print(f"running the authors' {code} code: {name} ...", flush=True)
            subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], check=True)
            result[name] = json.loads(part.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} kB)")
    return 0


def fixture_summary(fx) -> dict:
    """Fingerprints of a few fixture weights: the tests check them first, so a changed init is named as such."""
    generator, clip = fx.generator(), fx.clip()
    g, c = generator.state_dict(), clip.model.state_dict()
    keys_g = ["style.1.weight", "conv1.conv.weight", "convs.5.conv.modulation.weight", "to_rgbs.3.conv.weight"]
    keys_c = ["token_embedding.weight", "transformer.resblocks.11.mlp.c_fc.weight", "visual.conv1.weight", "visual.proj"]
    return {"generator": {k: fx.summary(g[k]) for k in keys_g}, "clip": {k: fx.summary(c[k]) for k in keys_c}}


# ----------------------------------------------------------------------------
# A child: one of the authors' training runs, patched and recorded


def _cpu(device):
    import torch

    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def patched(clip_file: str):
    """Patches 1-5 and 7 of the module docstring (6 is in `run_job`), undone on exit."""
    import clip
    import torch
    import torch.utils.cpp_extension
    import torchvision

    saved = []

    def replace(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def stand_in(*_args, **_kwargs):
        return types.SimpleNamespace()  # any use raises AttributeError: no kernel is ever called

    module_to, tensor_to, torch_load, clip_load = torch.nn.Module.to, torch.Tensor.to, torch.load, clip.load

    def on_cpu(args, kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return tuple(_cpu(a) for a in args), kwargs

    replace(torch.utils.cpp_extension, "load", stand_in)
    replace(torch.nn.Module, "to", lambda self, *a, **k: module_to(self, *on_cpu(a, k)[0], **on_cpu(a, k)[1]))
    replace(torch.Tensor, "to", lambda self, *a, **k: tensor_to(self, *on_cpu(a, k)[0], **on_cpu(a, k)[1]))
    replace(torch.Tensor, "cuda", lambda self, *a, **k: self)
    replace(torch.Tensor, "cpu", lambda self, *a, **k: self.clone())  # a copy, as from their GPU
    def load(f, map_location=None, **kwargs):
        if hasattr(f, "seek"):
            f.seek(0)  # clip.load reads its open file again after a failed TorchScript attempt
        return torch_load(f, map_location="cpu", **kwargs)

    replace(torch, "load", load)
    replace(clip, "load", lambda name, device="cpu", jit=False, **k: clip_load(clip_file, device="cpu", jit=False))
    resize_init = torchvision.transforms.Resize.__init__

    def resize(self, *args, antialias=False, **kwargs):
        resize_init(self, *args, antialias=antialias, **kwargs)

    replace(torchvision.transforms.Resize, "__init__", resize)
    layer_norm = clip.model.LayerNorm.forward
    replace(clip.model.LayerNorm, "forward", lambda self, x: layer_norm(self, x.clone()))
    if importlib.util.find_spec("cv2") is None:
        sys.modules["cv2"] = types.ModuleType("cv2")
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


class Recorder:
    """Collects what the wrapped methods see, step by step."""

    def __init__(self, summary):
        self.summary = summary
        self.stage1: list[dict] = []
        self.stage2: list[dict] = []
        self.current: dict | None = None  # the stage-2 step being recorded
        self.in_layer_choice = False
        self.names: dict[int, str] = {}  # id(parameter) -> ipltool's name for it
        self.first_step_seen: set[int] = set()

    def name_parameters(self, module, drop_prefix: str = "") -> None:
        for name, param in module.named_parameters():
            self.names[id(param)] = name.removeprefix(drop_prefix)

    def optimizer_step(self, optimizer, step):
        """Record grads (and, on an optimizer's first step, the weights before it), step, record the updated weights."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        entry: dict = {"grads": {self.names[id(p)]: self.summary(p.grad) for p in params}}
        if id(optimizer) not in self.first_step_seen:
            self.first_step_seen.add(id(optimizer))
            everything = [p for group in optimizer.param_groups for p in group["params"]]
            entry["before"] = {self.names[id(p)]: self.summary(p) for p in everything}
        out = step()
        entry["after"] = {self.names[id(p)]: self.summary(p) for p in params}
        target = self.current if self.current is not None else self.stage1[-1]
        target.update(entry)
        return out


def _wrap(owner, name, make):
    original = getattr(owner, name)
    setattr(owner, name, make(original))


def _install_recorder(rec: Recorder, code: str) -> None:
    """Wrap the authors' methods so that `rec` sees every step (patching their classes, not their files)."""
    import torch
    from model.ZSSGAN import ZSSGAN

    # The CLIPLoss that ZSSGAN uses (NADA imports it as ZSSGAN.criteria.clip_loss, a
    # second copy of the module beside criteria.clip_loss).
    CLIPLoss = sys.modules[ZSSGAN.__module__].CLIPLoss
    if code == "ipl":
        from mapper import latent_mappers

        def mapper_init(original):
            def init(self, *a, **k):
                original(self, *a, **k)
                rec.name_parameters(self, drop_prefix="mapping.")  # SingleMapper.mapping is ipltool's MLPMapper
            return init

        _wrap(latent_mappers.SingleMapper, "__init__", mapper_init)

    def zssgan_init(original):
        def init(self, *a, **k):
            original(self, *a, **k)
            self.device = "cpu"  # NADA hard-codes 'cuda:0'
            for loss in self.clip_loss_models.values():
                loss.device = "cpu"
            rec.name_parameters(self.generator_trainable.generator)
        return init

    def forward(original):
        def run(self, *a, **k):
            if not self.training:  # NADA's sample grids also go through forward
                return original(self, *a, **k)
            rec.current = {"terms": {}}
            images, loss = original(self, *a, **k)
            rec.current["loss"] = loss.item()
            (clip_loss,) = self.clip_loss_models.values()
            rec.current["text_direction"] = clip_loss.target_direction.detach().double().tolist()
            rec.stage2.append(rec.current)
            return images, loss
        return run

    def layer_choice(original):
        def choose(self):
            rec.in_layer_choice = True
            try:
                chosen = original(self)
            finally:
                rec.in_layer_choice = False
            layers = list(self.generator_trainable.get_all_layers())
            by_index = layers[2:4] + list(layers[4])
            rec.current["layers"] = sorted(next(i for i, m in enumerate(by_index) if m is c) for c in chosen)
            return chosen
        return choose

    def global_loss(original):
        def run(self, *a, **k):
            loss = original(self, *a, **k)
            if k.get("is_contrastive"):
                rec.stage1.append({"loss": loss.item()})
            elif rec.current is not None and "loss" not in rec.current and not rec.in_layer_choice:
                rec.current["terms"]["global"] = loss.item()
            return loss
        return run

    def directional_loss(original):
        def run(self, *a, **k):
            loss = original(self, *a, **k)
            if rec.current is not None and "loss" not in rec.current:
                rec.current["terms"]["directional"] = loss.item()
            return loss
        return run

    def adam_step(original):
        def step(self, *a, **k):
            return rec.optimizer_step(self, lambda: original(self, *a, **k))
        return step

    _wrap(ZSSGAN, "__init__", zssgan_init)
    _wrap(ZSSGAN, "forward", forward)
    _wrap(ZSSGAN, "determine_opt_layers", layer_choice)
    _wrap(CLIPLoss, "global_clip_loss", global_loss)
    _wrap(CLIPLoss, "clip_directional_loss", directional_loss)
    _wrap(torch.optim.Adam, "step", adam_step)


def _argv(code: str, files: dict, work: str, options: dict, fx) -> list[str]:
    """The authors' command line for one golden run (their flag names, the fixture's settings)."""
    s1, s2 = fx.STAGE1, fx.STAGE2
    common = [
        "--frozen_gen_ckpt", files["generator"], "--size", str(fx.GENERATOR.size),
        "--source_class", fx.SOURCE, "--target_class", fx.TARGET, "--output_dir", work,
        "--batch", str(s2["batch"]), "--lr", str(s2["lr"]), "--n_sample", str(s2["n_sample"]),
        "--auto_layer_k", str(s2["auto_layer_k"]), "--auto_layer_iters", str(s2["auto_layer_iters"]),
        "--auto_layer_batch", str(s2["auto_layer_batch"]), "--clip_models", "ViT-B/32", "--clip_model_weights", "1.0",
        "--lambda_direction", "1.0",
    ]
    if code == "ipl":
        return common + [
            "--channel_multiplier", str(fx.GENERATOR.channel_multiplier),
            "--run_stage1", "--run_stage2", "--ctx_init", fx.CTX_INIT,
            "--batch_mapper", str(s1["batch"]), "--iter_mapper", str(s1["steps"]), "--lr_mapper", str(s1["lr"]),
            "--lambda_l", str(s1["lambda_l"]), "--lambda_src", str(s1["lambda_src"]),
            "--seed1", str(s1["seed"]), "--seed2", str(s2["seed"]),
            "--iter", str(s2["steps"]), "--ema_decay", str(s2["ema"]),
            "--output_interval", "1000000", "--save_interval", str(s2["steps"]),
        ]
    return common + ["--iter", str(fx.NADA["steps"]), "--lambda_global", str(options["lambda_global"]),
                     "--output_interval", "1000000"]


def run_job(job: dict, instrument: Callable[[types.ModuleType], None] | None = None) -> None:
    """Run one of the authors' trainings on the fixture and write what was recorded.

    `instrument` (for benchmarks/authors_steps.py) is called with their loaded `train`
    module in place of installing the recorder; the run then takes its command line from
    `job["argv"]` (their flags) and writes nothing.
    """
    import torch

    fx = _fixture()
    source = Path(job["source"])
    root = source / "ZSSGAN" if job["code"] == "nada" else source
    sys.path[:0] = [str(root), str(source), job["clip_source"]]
    os.makedirs(job["work"], exist_ok=True)
    os.chdir(root)  # NADA's ZSSGAN.py puts '../' on sys.path
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rec = Recorder(fx.summary)
    with patched(job["files"]["clip"]):
        spec = importlib.util.spec_from_file_location(f"{job['code']}_train", root / "train.py")
        train = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(train)
        train.device = "cpu"  # their train.py sets it in its __main__ block
        train.save_images = lambda *args, **kwargs: None  # patch 6
        if instrument is None:
            _install_recorder(rec, job["code"])
        else:
            instrument(train)
        from options.train_options import TrainOptions

        argv = job["argv"] if instrument is not None else _argv(job["code"], job["files"], job["work"], job["options"], fx)
        sys.argv = ["train.py"] + argv
        args = TrainOptions().parse()
        train.train(args)
    if instrument is not None:
        return
    out: dict = {"argv": sys.argv[1:], "stage2": rec.stage2}
    if job["code"] == "ipl":
        out["stage1"] = rec.stage1
        mapper = torch.load(Path(job["work"]) / "checkpoint" / "mapper" / "mapper.pt", map_location="cpu")["m"]
        out["mapper_final"] = {k[len("mapping."):]: fx.summary(v) for k, v in mapper.items()}
        steps = fx.STAGE2["steps"]
        ema = torch.load(Path(job["work"]) / "checkpoint" / "generator" / f"{steps:06d}.pt", map_location="cpu")["g_ema"]
        out["ema_final"] = {k: fx.summary(v) for k, v in ema.items()}
    Path(job["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--job":
        run_job(json.loads(sys.argv[2]))
    else:
        sys.exit(main())
