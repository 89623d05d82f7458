"""`ipl generate`, `ipl blend` and `--strength`/`--blend`: seeds, weight mixing, pictures, grids, reruns."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipltool.errors import CheckpointError, UsageError
from ipltool.models.stylegan2 import TINY_CONFIG, build_generator, load_generator
from ipltool.render.blend import mix_states, mixed_generator, parse_blend, parse_number_list
from ipltool.render.latents import slerp, walk_times
from ipltool.render.seeds import parse_seeds, seed_range

pytestmark = pytest.mark.xdist_group("generate")


def _adapted(source, seed: int, layers=("convs.0.conv.weight", "conv1.conv.weight")):
    """A copy of `source` with some synthesis layers moved, as an adaptation does (mapping untouched)."""
    target = build_generator(TINY_CONFIG, seed=0, noise_strength=0.1)
    target.load_state_dict(source.state_dict())
    g = torch.Generator().manual_seed(seed)
    state = target.state_dict()
    for key in layers:
        state[key] += 0.1 * torch.randn(state[key].shape, generator=g)
    target.load_state_dict(state)
    return target.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def source():
    return build_generator(TINY_CONFIG, seed=0, noise_strength=0.1).eval().requires_grad_(False)


# ----------------------------------------------------------------------------
# Seeds and paths


def test_seed_lists_as_people_type_them():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("1,5,9") == [1, 5, 9]
    assert parse_seeds("3, 0-2,3") == [3, 0, 1, 2]  # order kept, repeats dropped
    assert seed_range(3, 7) == [7, 8, 9]
    for bad in ("", "a", "5-2", "-1", "0-999999999"):
        with pytest.raises(UsageError):
            parse_seeds(bad)
    with pytest.raises(UsageError):
        seed_range(0, 0)


def test_walk_times_and_slerp_endpoints():
    assert walk_times(3, 2, loop=False) == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5), (1, 1.0)]
    assert walk_times(2, 2, loop=True) == [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5)]  # back to the start, no duplicate seam
    a, b = torch.randn(8, generator=torch.Generator().manual_seed(1)), torch.randn(8, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    middle = slerp(a, b, 0.5)  # on the arc: its norm stays between the ends' (a straight line sags towards 0)
    assert middle.norm() > (a + b).norm() / 2


# ----------------------------------------------------------------------------
# Weight mixing


def test_strength_endpoints_are_bit_exact_and_between_is_the_weighted_mean(source):
    target = _adapted(source, 1)
    s_state, t_state = source.state_dict(), target.state_dict()
    zero = mixed_generator(source, [(target, 0.0)], ["t"]).state_dict()
    one = mixed_generator(source, [(target, 1.0)], ["t"]).state_dict()
    half = mixed_generator(source, [(target, 0.5)], ["t"]).state_dict()
    strong = mixed_generator(source, [(target, 2.0)], ["t"]).state_dict()
    for key in s_state:
        assert torch.equal(zero[key], s_state[key]), key
        assert torch.equal(one[key], t_state[key]), key
        expected = (s_state[key].double() + t_state[key].double()) / 2
        assert torch.allclose(half[key].double(), expected, atol=1e-7), key
        assert torch.allclose(strong[key].double(), 2 * t_state[key].double() - s_state[key].double(), atol=1e-6), key
    changed = "convs.0.conv.weight"
    assert not torch.equal(half[changed], s_state[changed]) and not torch.equal(half[changed], t_state[changed])


def test_blend_of_two_generators_by_hand(source):
    a, b = _adapted(source, 1), _adapted(source, 2, layers=("convs.1.conv.weight", "conv1.conv.weight"))
    mixed = mixed_generator(source, [(a, 0.25), (b, 0.75)], ["a", "b"]).state_dict()
    sa, sb, ss = a.state_dict(), b.state_dict(), source.state_dict()
    for key in ss:
        expected = 0.25 * sa[key].double() + 0.75 * sb[key].double()
        assert torch.allclose(mixed[key].double(), expected, atol=1e-7), key
    # Weights summing to 1 need no source: the same weights.
    without = mixed_generator(None, [(a, 0.25), (b, 0.75)], ["a", "b"]).state_dict()
    assert all(torch.equal(without[k], mixed[k]) for k in ss)
    with pytest.raises(UsageError, match="source"):
        mix_states(None, [(sa, 0.5), (sb, 0.6)])


def test_generators_of_other_sources_or_architectures_are_refused(source):
    other_source = build_generator(TINY_CONFIG, seed=5, noise_strength=0.1)
    with pytest.raises(CheckpointError, match="different source"):
        mixed_generator(source, [(_adapted(source, 1), 0.5), (_adapted(other_source, 2), 0.5)], ["a", "b"])
    bigger = build_generator(type(TINY_CONFIG)(size=64, style_dim=64, n_mlp=2, channel_multiplier=1, channel_max=32), seed=0)
    with pytest.raises(CheckpointError, match="different architectures"):
        mixed_generator(None, [(_adapted(source, 1), 0.5), (bigger, 0.5)], ["a", "b"])


def test_mix_option_parsing():
    assert parse_blend(["disney=0.5", "runs/x=y/generator.pt=0.5"]) == [("disney", 0.5), ("runs/x=y/generator.pt", 0.5)]
    assert parse_number_list("0, 0.5,1", "--strength") == [0.0, 0.5, 1.0]
    for bad in (["disney"], ["disney=0.5"], ["a=1", "a=2"], ["a=x", "b=1"], ["=1", "b=1"]):
        with pytest.raises(UsageError):
            parse_blend(bad)
    for bad in ("", "x", "nan", "1,inf"):
        with pytest.raises(UsageError):
            parse_number_list(bad, "--strength")


# ----------------------------------------------------------------------------
# The command, on --smoke runs of two domains


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ipl_at) -> Path:
    root = tmp_path_factory.mktemp("generate")
    for domain in ("disney", "pixar-character"):
        assert ipl_at(root, "--quiet", "adapt", "--domain", domain, "--smoke", "--steps", "2", "--out", str(root / "runs")) == 0
    return root / "runs"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_seed_renders_the_picture_of_ipl_eval(runs, tmp_path, run_cli):
    from ipltool.metrics.sampling import resolve_input

    run = next(runs.glob("disney-*"))
    code, _, err = run_cli("generate", "-g", "disney", "--runs", str(runs), "--seeds", "0-2", "--source", "--out", str(tmp_path / "g"))
    assert code == 0, err
    item = resolve_input(run, None, tmp_path / "report")
    batch = next(item.batches(0, 3, 3, 0.7, 0, torch.device("cpu")))
    for i in range(3):
        assert np.array_equal(_pixels(tmp_path / "g" / "disney" / f"seed{i:04d}.png"), batch["target"][i].permute(1, 2, 0).numpy())
        assert np.array_equal(_pixels(tmp_path / "g" / "source" / f"seed{i:04d}.png"), batch["source"][i].permute(1, 2, 0).numpy())
    # --n N --seed S is eval --seed S: sample i from seed S + i, the centre of S.
    code, _, err = run_cli("generate", "-g", str(run), "--n", "2", "--seed", "7", "--out", str(tmp_path / "h"))
    assert code == 0, err
    batch = next(item.batches(0, 2, 2, 0.7, 7, torch.device("cpu")))
    assert np.array_equal(_pixels(tmp_path / "h" / "disney" / "seed0008.png"), batch["target"][1].permute(1, 2, 0).numpy())


def test_grid_strength_strip_blend_and_reruns_that_add(runs, tmp_path, run_cli):
    out = tmp_path / "g"
    args = ["--json", "generate", "-g", "disney", "-g", "pixar-character", "--runs", str(runs), "--seeds", "1,5", "--source", "--grid",
            "--strength", "0,1", "--blend", "disney=0.5", "--blend", "pixar-character=0.5", "--out", str(out)]
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    summary = json.loads(stdout)
    columns = ["source", "disney-s0", "disney", "pixar-character-s0", "pixar-character", "blend-disney0.5-pixar-character0.5-s0", "blend-disney0.5-pixar-character0.5"]
    assert summary["columns"] == columns
    assert len(summary["pictures"]) == 2 * len(columns) and {p["status"] for p in summary["pictures"]} == {"written"}
    # Strength 0 is the source, bit for bit, in pictures too.
    for name in ("disney-s0", "pixar-character-s0", "blend-disney0.5-pixar-character0.5-s0"):
        assert np.array_equal(_pixels(out / name / "seed0005.png"), _pixels(out / "source" / "seed0005.png"))
    grid = Image.open(summary["grid"])
    from ipltool.figures import grid_layout

    layout = grid_layout(2, len(columns), 128, ["seed0001", "seed0005"], columns)
    assert grid.size == layout.size
    # The same command again: nothing new, nothing overwritten.
    before = {p["path"]: Path(p["path"]).read_bytes() for p in summary["pictures"]}
    code, stdout, _ = run_cli(*args)
    again = json.loads(stdout)
    assert code == 0 and {p["status"] for p in again["pictures"]} == {"unchanged"}
    assert again["grid"] == summary["grid"]
    # Another truncation: different pictures go beside the old ones.
    code, stdout, _ = run_cli("--json", "generate", "-g", "disney", "--runs", str(runs), "--seeds", "1", "--truncation", "1", "--out", str(out))
    assert code == 0
    (record,) = json.loads(stdout)["pictures"]
    assert record["path"].endswith("seed0001-2.png") and record["status"] == "written"
    assert all(Path(path).read_bytes() == data for path, data in before.items())


def test_latents_saved_by_stylize_render_again(runs, tmp_path, run_cli):
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    code, _, err = run_cli("stylize", str(photo), "--smoke", "--out", str(tmp_path / "st"), "--save-latents")
    assert code == 0, err
    code, stdout, err = run_cli("--json", "generate", "-g", "tiny", "--latents", str(tmp_path / "st" / "latents"), "--out", str(tmp_path / "g"))
    assert code == 0, err
    (record,) = json.loads(stdout)["pictures"]
    assert record["row"] == "astronaut"
    # The smoke encoder decodes with the tiny source generator: the reconstruction again.
    (reconstruction,) = (tmp_path / "st" / "reconstruction").iterdir()
    assert np.array_equal(_pixels(Path(record["path"])), _pixels(reconstruction))


def test_bad_input_is_one_line(runs, tmp_path, run_cli):
    cases = [
        (["-g", "disny", "--runs", str(runs)], "did you mean 'disney'"),
        (["-g", "ukiyo-e", "--runs", str(runs)], "no finished `ipl adapt` run of 'ukiyo-e'"),
        (["-g", "nothere/generator.pt"], "no such generator file"),
        (["-g", "disney", "--runs", str(runs), "--seeds", "1", "--n", "2"], "not both"),
        (["-g", "disney", "--runs", str(runs), "--blend", "disney=1"], "at least two"),
        (["-g", "disney", "--runs", str(runs), "--truncation", "1.5"], "--truncation"),
        (["-g", "disney", "--runs", str(runs), "--interpolate", "3"], "at least two seeds"),
        (["-g", "disney", "--runs", str(runs), "--video", "x.mp4"], "--interpolate"),
        ([], "no generator"),
    ]
    for args, message in cases:
        code, _, err = run_cli("generate", *args, "--out", str(tmp_path / "g"))
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_file_outside_a_run_needs_its_source_for_strength(runs, tmp_path, run_cli):
    file = tmp_path / "copy.pt"
    file.write_bytes((next(runs.glob("disney-*")) / "generator.pt").read_bytes())
    code, _, err = run_cli("generate", "-g", str(file), "--strength", "0.5", "--out", str(tmp_path / "g"))
    assert code == 2 and "--source-generator" in err
    code, _, err = run_cli("generate", "-g", str(file), "--strength", "0.5", "--source-generator", "tiny", "--out", str(tmp_path / "g"))
    assert code == 0, err
    assert (tmp_path / "g" / "copy-s0.5" / "seed0000.png").is_file()


def test_ipl_blend_writes_a_normal_checkpoint(runs, tmp_path, run_cli):
    out = tmp_path / "mix.pt"
    code, _, err = run_cli("blend", "disney", "pixar-character", "--weights", "0.5,0.5", "--out", str(out), "--runs", str(runs))
    assert code == 0, err
    mixed = load_generator(out).state_dict()
    a = load_generator(next(runs.glob("disney-*")) / "generator.pt").state_dict()
    b = load_generator(next(runs.glob("pixar-character-*")) / "generator.pt").state_dict()
    for key in mixed:
        assert torch.allclose(mixed[key].double(), 0.5 * a[key].double() + 0.5 * b[key].double(), atol=1e-7), key
    assert torch.load(out, weights_only=True)["blend"]["weights"] == [0.5, 0.5]
    # Never over an existing file, nor over an input.
    code, _, err = run_cli("blend", "disney", "pixar-character", "-w", "0.5,0.5", "--out", str(out), "--runs", str(runs))
    assert code == 2 and "exists" in err
    code, _, err = run_cli("blend", "disney", "-w", "1,2", "--out", str(tmp_path / "x.pt"), "--runs", str(runs))
    assert code == 2 and "2 weights" in err
    # Its pictures are those of `generate --blend`.
    code, _, err = run_cli("generate", "-g", str(out), "--blend", "disney=0.5", "--blend", "pixar-character=0.5", "--runs", str(runs), "--seeds", "3", "--out", str(tmp_path / "g"))
    assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "g" / "mix" / "seed0003.png"), _pixels(tmp_path / "g" / "blend-disney0.5-pixar-character0.5" / "seed0003.png"))


def test_stylize_and_eval_take_strength_and_blend(runs, tmp_path, run_cli):
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    out = tmp_path / "st"
    code, _, err = run_cli("stylize", str(photo), "--smoke", "-d", "disney", "--runs", str(runs), "--strength", "0,1",
                           "--blend", "disney=0.5", "--blend", "pixar-character=0.5", "--out", str(out))
    assert code == 0, err
    assert sorted(p.name for p in (out / "stylized").iterdir()) == ["blend-disney0.5-pixar-character0.5", "disney", "disney-s0"]
    (reconstruction,) = (out / "reconstruction").iterdir()
    (weak,) = (out / "stylized" / "disney-s0").iterdir()
    assert np.array_equal(_pixels(weak), _pixels(reconstruction))  # strength 0: the encoder's own generator

    code, stdout, err = run_cli("--json", "eval", str(next(runs.glob("disney-*"))), "--smoke", "--metrics", "diversity", "--n", "4",
                                "--strength", "0.5", "--blend", "disney=0.5", "--blend", "pixar-character=0.5", "--runs", str(runs),
                                "--report", str(tmp_path / "report"))
    assert code == 0, err
    names = [r["name"] for r in json.loads(stdout)["runs"]]
    assert len(names) == 2 and names[0].endswith("-s0.5") and names[1] == "blend-disney0.5-pixar-character0.5-s0.5"


def test_a_stop_request_keeps_the_batches_done(source, tmp_path):
    from ipltool.interrupt import StopRequest
    from ipltool.render.generate import Column, RenderOptions, generate_pictures, seed_rows

    stop = StopRequest()

    def progress(done, total):
        stop.requested = True  # as Ctrl-C during the first batch

    columns = [Column("a", _adapted(source, 1), source, "tiny")]
    result = generate_pictures(columns, seed_rows(range(6)), tmp_path, RenderOptions(batch=2), grid=True, on_progress=progress, stop=stop)
    assert result.stopped and [p["row"] for p in result.written] == ["seed0000", "seed0001"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["seed0000.png", "seed0001.png"]
    assert Image.open(tmp_path / "grid.png").size[1] < 400  # the grid of what was done: two rows


def _read_back(path: Path) -> tuple[dict, list[np.ndarray]]:
    """(meta, frames) of a video, decoded by imageio-ffmpeg, the library that wrote it."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
    return meta, frames


def test_interpolation_video_mp4_and_gif(runs, tmp_path, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    video = tmp_path / "walk.mp4"
    args = ["generate", "-g", "disney", "-g", "pixar-character", "--source", "--runs", str(runs), "--interpolate", "0,3,7",
            "--frames", "4", "--fps", "12", "--video", str(video)]
    code, _, err = run_cli(*args)
    assert code == 0, err
    meta, frames = _read_back(video)
    assert len(frames) == 2 * 4 + 1 and meta["fps"] == 12
    assert meta["codec"].startswith("h264")
    width, height = meta["size"]
    assert width > 3 * 128 and height >= 128  # three columns side by side, under their labels
    # The first and last frames are seeds 0 and 7: the walk passes through its keys, and moves between them.
    assert np.abs(frames[0].astype(int) - frames[-1].astype(int)).mean() > 1
    # Again: a new file beside the old one.
    code, _, err = run_cli(*args)
    assert code == 0 and (tmp_path / "walk-2.mp4").is_file()
    # A looping GIF in W: 2 keys x 3 frames, no repeated seam frame.
    gif = tmp_path / "walk.gif"
    code, _, err = run_cli("generate", "-g", "disney", "--runs", str(runs), "--interpolate", "0,3", "--frames", "3", "--loop",
                           "--space", "w", "--video", str(gif))
    assert code == 0, err
    with Image.open(gif) as picture:
        assert picture.n_frames == 6
    assert not (tmp_path / "generated").exists()  # --video elsewhere: no output folder made
