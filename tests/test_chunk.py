"""`--chunk`: how many images stage 1, the layer choice and the sample grids render at once (memory only), and the peak-memory report."""

import json

import pytest
import torch

from ipltool.domain import load_domain
from ipltool.models.stylegan2 import TINY_CONFIG, build_generator
from ipltool.train import guard, stage1_run, stage2, stage2_run
from ipltool.train.run import RunDir
from ipltool.train.setup import SMOKE_OVERRIDES
from ipltool.train.stage2 import choose_layers, clip_terms


def _spy_chunks(monkeypatch) -> dict[str, list]:
    """Record the chunk every renderer of a run was given."""
    seen: dict[str, list] = {"stage1": [], "layer_scores": [], "grid": []}
    real_stage1_step, real_scores, real_grid = stage1_run.stage1_step, stage2.layer_scores, stage2_run.SampleGrid

    def stage1_step(state, generator, prompts, domain, chunk=8):
        seen["stage1"].append(chunk)
        return real_stage1_step(state, generator, prompts, domain, chunk)

    def layer_scores(source, trainable, terms, z, noises, precision=stage2.FP32, scaler=None, chunk=None):
        seen["layer_scores"].append((precision.name, chunk))
        return real_scores(source, trainable, terms, z, noises, precision, scaler, chunk)

    def grid(*args, **kwargs):
        seen["grid"].append(kwargs["chunk"])
        return real_grid(*args, **kwargs)

    monkeypatch.setattr(stage1_run, "stage1_step", stage1_step)
    monkeypatch.setattr(stage2, "layer_scores", layer_scores)
    monkeypatch.setattr(stage2_run, "SampleGrid", grid)
    return seen


def _weights(result):
    return torch.load(RunDir.open(result["run_dir"]).generator_path, weights_only=True)["g_ema"]


def test_adapt_chunk_reaches_every_renderer_and_changes_no_result(run_cli, tmp_path, monkeypatch):
    seen = _spy_chunks(monkeypatch)
    base = ("--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--json")
    code, out, err = run_cli(*base, "--out", str(tmp_path / "whole"))
    assert code == 0, err
    whole = json.loads(out)
    # The default (8) covers the smoke batches (mapper 4, layer choice 2): one render each.
    assert set(seen["stage1"]) == {8} and seen["layer_scores"] == [("fp32", 8)] * 3 and seen["grid"] == [8]
    for key in seen:
        seen[key].clear()
    code, out, err = run_cli(*base, "--chunk", "1", "--out", str(tmp_path / "parts"))
    assert code == 0, err
    parts = json.loads(out)
    assert set(seen["stage1"]) == {1} and seen["layer_scores"] == [("fp32", 1)] * 3 and seen["grid"] == [1]
    # The same layers at every step, and the same weights to float rounding.
    logs = [[r["layers"] for r in RunDir.open(r["run_dir"]).read_log() if r["stage"] == "adapt"] for r in (whole, parts)]
    assert logs[0] == logs[1]
    a, b = _weights(whole), _weights(parts)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert isinstance(whole["peak_memory_bytes"], int) and whole["peak_memory_bytes"] > 0


def test_train_mapper_chunk_reaches_stage1(run_cli, tmp_path, monkeypatch):
    seen = _spy_chunks(monkeypatch)
    code, out, err = run_cli("--device", "cpu", "train-mapper", "--domain", "disney", "--smoke", "--chunk", "3", "--out", str(tmp_path))
    assert code == 0, err
    assert set(seen["stage1"]) == {3}
    assert "peak memory" in err and "GiB (cpu, resident)" in err


def test_chunk_below_one_is_refused_in_one_line(run_cli, tmp_path):
    code, out, err = run_cli("--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--chunk", "0", "--out", str(tmp_path))
    assert code == 2 and "--chunk" in err and "Traceback" not in err


def test_confirmation_in_fp32_renders_half_the_reduced_chunk(stage2_models, monkeypatch):
    from ipltool.precision import Precision

    source, clip, _, _ = stage2_models
    domain = load_domain("disney").with_overrides(SMOKE_OVERRIDES)
    terms = clip_terms([(clip, 1.0)], domain)
    trainable = build_generator(TINY_CONFIG, seed=0)
    monkeypatch.setattr(stage2, "LAYER_CHOICE_MARGIN", 10.0)  # every choice is confirmed
    passes = []
    real = stage2.layer_scores

    def spy(source, trainable, terms, z, noises, precision=stage2.FP32, scaler=None, chunk=None):
        passes.append((precision.name, chunk))
        return real(source, trainable, terms, z, noises, precision, scaler, chunk)

    monkeypatch.setattr(stage2, "layer_scores", spy)
    for chunk, expected in ((None, 4), (8, 4), (16, 4), (4, 2), (3, 1), (1, 1)):
        passes.clear()
        torch.manual_seed(0)
        choose_layers(source, trainable, terms, k=3, iters=1, batch=8, precision=Precision.of("bf16", "cpu"), chunk=chunk)
        assert passes == [("bf16", chunk), ("fp32", expected)], chunk


def test_memory_check_counts_one_chunk_of_the_layer_choice_and_names_chunk(tmp_path):
    domain = load_domain("disney").with_overrides({"adapt.auto_layer_batch": 8})
    generator = build_generator(TINY_CONFIG, seed=0)
    per_image = guard._activation_bytes(generator)
    needs = {what: (need, hint) for what, need, hint in guard.memory_needs(domain, generator, ("adapt",), chunk=None)}
    assert needs["adapt.auto_layer_batch = 8"] == (8 * per_image, "render fewer at once with --chunk N (the same results)")
    needs = {what: (need, hint) for what, need, hint in guard.memory_needs(domain, generator, ("adapt",), chunk=2)}
    assert needs["the layer choice's renders (2 at a time, --chunk)"][0] == 2 * per_image
    # A chunk as large as the batch (or larger) renders it whole.
    assert "adapt.auto_layer_batch = 8" in dict((w, n) for w, n, _ in guard.memory_needs(domain, generator, ("adapt",), chunk=16))


def test_peak_memory_counts_from_its_reset():
    import mmap

    guard.reset_peak_memory("cpu")
    before = guard.peak_memory("cpu")
    # Fresh pages from the kernel, touched: malloc's free lists (which an earlier test in
    # this process may have told to keep freed blocks) cannot serve them.
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    after = guard.peak_memory("cpu")
    block.close()
    assert before is not None and after - before >= 48 * 2**20
    guard.reset_peak_memory("cpu")
    assert guard.peak_memory("cpu") < after  # the freed block no longer counts
    assert guard.describe_peak("cpu", 3 * 2**30) == "peak memory 3.0 GiB (cpu, resident)"
    assert guard.describe_peak("mps", None) == "peak memory unknown (mps)"


def test_resume_takes_another_chunk(run_cli, tmp_path, monkeypatch):
    """After running out of memory a run continues with a lower --chunk: it is not a setting --resume refuses."""
    base = ("--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--json", "--out", str(tmp_path))
    code, out, err = run_cli(*base[:-2], "--steps", "2", "--out", str(tmp_path))
    assert code == 0, err
    run_dir = json.loads(out)["run_dir"]
    seen = _spy_chunks(monkeypatch)
    code, out, err = run_cli("--device", "cpu", "adapt", "--resume", run_dir, "--steps", "3", "--chunk", "1", "--json")
    assert code == 0, err
    assert seen["layer_scores"] == [("fp32", 1)] and json.loads(out)["resumed_from"] == 2


def test_the_memory_benchmark_counts_live_tensors_once_each():
    """benchmarks/peak_memory.py's tracker: views and in-place results share their storage, freed tensors stop counting."""
    from bench import load

    tracker = load("peak_memory").tensor_tracker()
    mib = 2**20
    with tracker:
        a = torch.zeros(mib // 4)  # 1 MiB each
        b = torch.ones(mib // 4)
        view = a[: mib // 8]
        view.add_(1)  # in place, through a view: no new storage
        del b
        c = torch.full((mib // 4,), 2.0)
        d = a + c  # the third live MiB
    assert tracker.peaks["setup"] == 3 * mib
    del a, view, c, d
    assert tracker.live == 0


def _two_steps(stage2_models, chunk, layer_scores=None, monkeypatch=None):
    """Two stage-2 steps from seed 0 with the layer choice on 4 images; returns (records, G_t weights, final chunk)."""
    from ipltool.train.stage2 import stage2_step, start_stage2

    source, clip, prompts, mapper = stage2_models
    domain = load_domain("disney").with_overrides({**SMOKE_OVERRIDES, "adapt.auto_layer_batch": 4})
    terms = clip_terms([(clip, 1.0)], domain)
    if layer_scores is not None:
        monkeypatch.setattr(stage2, "layer_scores", layer_scores)
    torch.manual_seed(0)
    state = start_stage2(source, domain, chunk=chunk)
    records = [stage2_step(state, source, terms, domain, mapper, prompts) for _ in range(2)]
    return records, {k: v.clone() for k, v in state.trainable.state_dict().items()}, state.chunk


def test_layer_choice_out_of_memory_halves_the_chunk_and_keeps_the_runs_draws(stage2_models, monkeypatch, capsys):
    real = stage2.layer_scores

    def tight(source, trainable, terms, z, noises, precision=stage2.FP32, scaler=None, chunk=None):
        if (chunk or z.shape[0]) > 1:
            torch.randn(100)  # work done before the allocation failed also drew random numbers
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(source, trainable, terms, z, noises, precision, scaler, chunk)

    reference, weights, _ = _two_steps(stage2_models, 1)
    records, halved, chunk = _two_steps(stage2_models, None, tight, monkeypatch)
    assert chunk == 1  # 4 -> 2 -> 1, then kept for the second step
    err = capsys.readouterr().err
    assert "ran out of memory rendering 4 images at once; it renders 2 from now on (as --chunk 2" in err
    assert "rendering 2 images at once; it renders 1" in err and err.count("ran out of memory") == 2
    # The step a run started at --chunk 1 takes: same layers, losses and weights.
    assert [(r["layers"], r["loss"]) for r in records] == [(r["layers"], r["loss"]) for r in reference]
    for key in weights:
        assert torch.equal(halved[key], weights[key]), key


def test_layer_choice_out_of_memory_at_one_image_goes_to_the_step_guard(stage2_models, monkeypatch):
    def never(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        _two_steps(stage2_models, None, never, monkeypatch)
