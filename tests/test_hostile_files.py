"""No file a user names may run code, and none may fail with more than one line.

One parametrized test feeds every path that reads a user-named file, through the CLI,
three files: a plain pickle and a `torch.save` zip archive whose pickle holds an object
whose `__reduce__` would create a marker file, and an empty file. The marker must never
appear, and each command must stop with one line naming the file (exit code 2), except
where a bad file is not an error: a planted eval feature cache is recomputed (exit 0),
and an eval input whose generator cannot be read is skipped like any input with nothing
to measure (exit 1, see `ipl eval --help`).
"""

from __future__ import annotations

import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

KINDS = ("pickle", "zip", "empty")


class _RunsCode:
    """Unpickling this object runs `exec`, which creates `marker`: what a crafted checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def write_hostile(path: Path, kind: str, marker: Path) -> Path:
    """A file of `kind` at `path`: "pickle" (protocol 2), "zip" (`torch.save`) or "empty"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"g_ema": _RunsCode(marker), "state_dict": _RunsCode(marker)}, protocol=2))
    elif kind == "zip":
        torch.save({"g_ema": _RunsCode(marker), "state_dict": _RunsCode(marker)}, path)
    else:
        path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, ipl_at) -> dict[str, Path]:
    """A NADA `--smoke` adapt run (1 step), a photo, and a domain whose generator is the tiny one."""
    root = tmp_path_factory.mktemp("hostile")
    args = ["--quiet", "adapt", "--domain", "disney", "--smoke", "--method", "nada", "--steps", "1", "--out", str(root / "runs")]
    assert ipl_at(root, *args) == 0
    run = next((root / "runs").iterdir())
    photo = root / "photo.png"
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=gen)
    Image.fromarray(pixels.numpy()).save(photo)
    return {"root": root, "run": run, "photo": photo}


def _domain(path: Path, generator: str = "tiny", pretrained: str | None = None) -> Path:
    """A domain file with the tiny CLIP (optionally from a weights file) and `generator`."""
    clip = f'model = "tiny"\npretrained = "{pretrained}"\n' if pretrained else 'model = "tiny"\n'
    path.write_text(
        f'name = "hostile"\nsource = "photo"\ntarget = "sketch"\ngenerator = "{generator}"\n'
        f"[[clip]]\n{clip}weight = 1.0\n[mapper]\nsteps = 1\nbatch = 2\n",
        encoding="utf-8",
    )
    return path


@dataclass
class Case:
    """One path that reads a user-named file: how to plant the file, the command, the outcome."""

    name: str
    file: str  # where the hostile file goes, relative to the test's folder ("RUN/..." inside a copy of the run)
    args: tuple[str, ...]  # "{file}", "{run}", "{photo}", "{tmp}" are filled in
    code: int = 2
    kinds: tuple[str, ...] = KINDS  # the slow cases skip "empty" where another case covers it


OUT = ("--out", "{tmp}/o")
EVAL = ("--n", "2", "--report", "{tmp}/r")
PAIRED = ("eval", "{run}/generator.pt", "-d", "{tmp}/gen.toml")  # a checkpoint input: real (not smoke) networks
CASES = [
    Case("adapt --mapper", "mapper.pt", ("adapt", "--domain", "disney", "--smoke", "--mapper", "{file}", *OUT)),
    Case("adapt --resume (state.pt)", "RUN/state.pt", ("adapt", "--resume", "{run}")),
    Case("adapt --style-images", "style/look.png", ("adapt", "-d", "disney", "--smoke", "--method", "nada", "--style-images", "{tmp}/style", *OUT),
         kinds=("pickle", "zip")),
    Case("train-mapper: domain generator file", "gen.pt", ("train-mapper", "--domain", "{tmp}/file-gen.toml", *OUT)),
    Case("train-mapper: domain CLIP weights file", "clip.pt", ("train-mapper", "--domain", "{tmp}/clip.toml", *OUT)),
    Case("stylize -g FILE", "gen.pt", ("stylize", "{photo}", "--no-align", "--smoke", "-g", "{file}", *OUT)),
    Case("stylize -g RUN", "RUN/generator.pt", ("stylize", "{photo}", "--no-align", "--smoke", "-g", "{run}", *OUT), kinds=("pickle", "zip")),
    Case("stylize --weights", "e4e.pt", ("stylize", "{photo}", "--no-align", "--weights", "{file}", *OUT)),
    Case("eval --inception-weights", "w.pth", ("eval", "{tmp}/pics", "-m", "is", "--inception-weights", "{file}", *EVAL)),
    Case("eval --sifid-weights", "w.pth", ("eval", "{tmp}/pics", "-m", "sifid", "--sifid-ref", "{photo}", "--sifid-weights", "{file}", *EVAL)),
    Case("eval --hed-weights", "w.pth", (*PAIRED, "-m", "scs", "--hed-weights", "{file}", *EVAL)),
    Case("eval --id-weights", "w.pth", (*PAIRED, "-m", "id", "--id-backbone", "arcface", "--id-weights", "{file}", *EVAL)),
    Case("eval RUN (generator.pt)", "RUN/generator.pt", ("eval", "{run}", "-m", "is", *EVAL), code=1),
    Case("eval RUN/eval-cache", "RUN/eval-cache", ("eval", "{run}", "-m", "is", *EVAL), code=0),
    Case("fetch --import .pt", "w.pth", ("fetch", "--import", "inception-v3-torchvision", "{file}")),
    Case("fetch --import NVlabs .pkl", "ffhq.pkl", ("fetch", "--import", "stylegan2-ffhq-1024", "{file}")),
]


@pytest.mark.parametrize("case, kind", [pytest.param(c, k, id=f"{c.name}-{k}") for c in CASES for k in c.kinds])
def test_no_user_named_file_runs_code(run_cli, world, tmp_path, case, kind):
    marker = tmp_path / "MARKER"
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    (tmp_path / "pics").mkdir()
    shutil.copy(world["photo"], tmp_path / "pics" / "a.png")
    shutil.copy(world["photo"], tmp_path / "pics" / "b.png")
    _domain(tmp_path / "gen.toml")
    _domain(tmp_path / "file-gen.toml", generator=str(tmp_path / "gen.pt"))
    _domain(tmp_path / "clip.toml", pretrained=str(tmp_path / "clip.pt"))
    fill = {"run": str(run), "photo": str(world["photo"]), "tmp": str(tmp_path)}

    if case.file == "RUN/eval-cache":  # an eval that wrote its caches, then every cache file replaced
        fill["file"] = str(run / "eval-cache")
        assert run_cli(*(a.format(**fill) for a in case.args))[0] == 0
        planted = sorted((run / "eval-cache").glob("*.pt"))
        assert planted
        for path in planted:
            write_hostile(path, kind, marker)
    else:
        target = run / case.file[4:] if case.file.startswith("RUN/") else tmp_path / case.file
        fill["file"] = str(write_hostile(target, kind, marker))

    code, out, err = run_cli(*(a.format(**fill) for a in case.args))
    text = " ".join(err.split())  # rich wraps long lines
    assert not marker.exists(), f"{case.name}: the file ran code"
    assert code == case.code, err
    assert "Traceback" not in err and "unexpected" not in err, err
    if case.code == 2:
        assert err.count("error:") == 1 and Path(fill["file"]).name in text, err
    elif case.code == 1:
        assert "skipped" in text and Path(fill["file"]).name in text, err
    else:  # the planted caches were recomputed and are ipltool's own again
        from ipltool.checkpoints import read_feature_cache

        assert all(read_feature_cache(p) is not None for p in planted)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.__setitem__("step", -3), "step -3 is out of range"),  # once ran 3 extra steps
        (lambda s: s.__setitem__("step", 99), "already at step 99, past adapt.steps = 1"),
        (lambda s: s["ema"].__setitem__("input.input", torch.zeros(1, 8, 4, 4)), "wrong shape (first: input.input is [1, 8, 4, 4]"),
        (lambda s: s.pop("stage"), "not an ipltool resume state"),  # the other cases: test_checkpoints.py
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_planted_resume_state_is_refused_before_use(run_cli, world, tmp_path, edit, message):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    state = torch.load(run / "state.pt", weights_only=True)
    edit(state)
    torch.save(state, run / "state.pt")
    before = (run / "log.jsonl").read_bytes()
    code, _, err = run_cli("adapt", "--resume", str(run))
    assert code == 2 and err.count("error:") == 1 and "Traceback" not in err, err
    text = " ".join(err.split())
    assert message in text and ("state.pt" in text or "already at step" in text), err
    assert (run / "log.jsonl").read_bytes() == before  # not a single step ran
