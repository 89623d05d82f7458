"""Values beyond what a run can take are one-line errors naming the flag or key, never "unexpected" (issue 14, section 4).

Each is refused before a run directory exists, or, for memory that runs out during a
step, with the run's last state kept.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ipltool.domain import MAX_SEED, parse_domain
from ipltool.errors import DomainError
from ipltool.train import stage2_run
from ipltool.train.run import RunDir

DOMAIN = 'name = "{name}"\nsource = "photo"\ntarget = "{target}"\ngenerator = "tiny"\n'
DEEP = 100_000


def _run(run_cli, tmp_path, command, *args):
    return run_cli("--device", "cpu", command, *args, "--out", str(tmp_path / "runs"))


def _one_line_error(code: int, err: str, *parts: str) -> None:
    assert code == 2 and "Traceback" not in err and "unexpected" not in err, err
    flat = " ".join(err.split())
    for part in parts:
        assert part in flat, (part, err)


def _no_run_dir(tmp_path: Path) -> None:
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("command", ["adapt", "train-mapper"])
@pytest.mark.parametrize("seed, message", [(2**64, f"--seed must be ≤ {MAX_SEED} (got {2**64})"), (-1, "--seed must be ≥ 0 (got -1)")])
def test_a_seed_torch_cannot_take_is_refused_before_any_run_dir(run_cli, tmp_path, command, seed, message):
    code, _, err = _run(run_cli, tmp_path, command, "--domain", "disney", "--smoke", "--seed", str(seed))
    _one_line_error(code, err, message)
    _no_run_dir(tmp_path)


def test_eval_refuses_a_seed_it_cannot_count_up_from(run_cli, tmp_path):
    code, _, err = run_cli("eval", str(tmp_path), "--seed", str(2**64), "--report", str(tmp_path / "report"))
    _one_line_error(code, err, f"--seed must be between 0 and {2**63 - 1} (got {2**64})")
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize(
    "command, args, message, flag",
    [
        ("adapt", ("--batch", "1000000000"), "adapt.batch = 1000000000 needs at least", "lower it with --batch"),
        ("adapt", ("--set", "adapt.auto_layer_batch=1000000000"), "adapt.auto_layer_batch = 1000000000 needs", "--set adapt.auto_layer_batch=N"),
        ("adapt", ("--set", "mapper.batch=10000000000"), "mapper.batch = 10000000000 needs", "--set mapper.batch=N"),
        ("train-mapper", ("--batch", "10000000000"), "mapper.batch = 10000000000 needs", "lower it with --batch"),
    ],
)
def test_a_batch_far_beyond_memory_is_refused_with_an_estimate(run_cli, tmp_path, command, args, message, flag):
    code, _, err = _run(run_cli, tmp_path, command, "--domain", "disney", "--smoke", *args)
    _one_line_error(code, err, message, "GiB is available", flag)
    _no_run_dir(tmp_path)


@pytest.mark.parametrize(
    "error, message",
    [
        (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 256000000000 bytes."),
         "stage 2 step 3: out of memory (it tried to allocate 238.4 GiB)"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "stage 2 step 3: out of memory"),
    ],
)
def test_memory_running_out_during_a_step_names_the_flag_and_keeps_the_state(run_cli, tmp_path, monkeypatch, error, message):
    real_step = stage2_run.stage2_step

    def step(state, *args, **kwargs):
        if state.step + 1 == 3:
            raise error
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(stage2_run, "stage2_step", step)
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", "disney", "--smoke", "--method", "nada", "--steps", "5", "--save-every", "1")
    _one_line_error(code, err, message, "start again with a lower --chunk (images the layer choice renders at once; same results) or --batch (adapt.batch)", "last finite state (step 2)")
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert RunDir.open(run_dir).load_state()["step"] == 2 and not (run_dir / "generator.pt").exists()


def test_a_domain_name_of_300_characters(run_cli, tmp_path):
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", "a" * 300, "--smoke")
    _one_line_error(code, err, "too long for a domain name (at most 100 characters)", "(300 characters)")
    path = tmp_path / "long.toml"
    path.write_text(DOMAIN.format(name="a" * 300, target="disney"))
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", str(path), "--smoke")
    _one_line_error(code, err, "long.toml:1: key 'name': too long (300 characters): a domain name has at most 100")
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", "disney", "--smoke", "--set", f'name="{"b" * 300}"')
    _one_line_error(code, err, "key 'name': too long (300 characters)")
    _no_run_dir(tmp_path)


def test_toml_nested_100000_deep(run_cli, tmp_path):
    deep = "[" * DEEP + "]" * DEEP
    path = tmp_path / "deep.toml"
    path.write_text(DOMAIN.format(name="deep", target="disney") + f"[mapper]\noptions = {{ a = {deep} }}\n")
    code, out, err = run_cli("prompts", "validate", str(path))
    assert code == 2 and "deep.toml: invalid TOML: arrays or tables nested too deeply" in out and "Traceback" not in out + err
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", str(path), "--smoke")
    _one_line_error(code, err, "deep.toml: invalid TOML: arrays or tables nested too deeply")
    shallower = "[" * 30_000 + "]" * 30_000  # a command line holds at most 128 kB
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", "disney", "--smoke", "--set", f"mapper.options={{a={shallower}}}")
    _one_line_error(code, err, "a --set value has arrays or tables nested too deeply")
    _no_run_dir(tmp_path)
    run = RunDir.create(tmp_path / "made", "deep", {"name": "deep"})
    run.config_path.write_text(f"a = {deep}\n")
    for command in ("adapt", "train-mapper"):
        code, _, err = _run(run_cli, tmp_path, command, "--resume", str(run.path))
        _one_line_error(code, err, "config.toml: invalid TOML: arrays or tables nested too deeply")


def test_a_text_longer_than_clips_context_is_refused_with_its_token_count(run_cli, tmp_path):
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", "disney", "--smoke", "--set", f'target="{"cartoon " * 75}"')
    _one_line_error(code, err, "target makes the sentence 'a photo of a cartoon", "82 tokens long", "reads at most 77", "shorten target")
    custom = ", ".join([f'"{"a long sentence " * 30}"'])
    code, _, err = _run(run_cli, tmp_path, "train-mapper", "--domain", "disney", "--smoke", "--set", f"prompts.custom=[{custom}]")
    _one_line_error(code, err, "prompts.custom[0] makes the sentence", "92 tokens long")
    _no_run_dir(tmp_path)


def test_a_10_mb_target_is_refused_at_once_without_tokenizing(run_cli, tmp_path, monkeypatch):
    from open_clip import tokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer ran")

    monkeypatch.setattr(tokenizer.SimpleTokenizer, "encode", refuse)
    monkeypatch.setattr(tokenizer.SimpleTokenizer, "__call__", refuse)
    text = DOMAIN.format(name="huge", target="x" * 10_000_000)
    started = time.perf_counter()
    with pytest.raises(DomainError, match=r"big.toml:3: key 'target' is too long \(10,000,000 characters\)"):
        parse_domain(text, "big.toml")
    assert time.perf_counter() - started < 0.5  # about 15 ms; a tokenizer or a TOML parse of 10 MB takes seconds
    # Under the size of a file the parser refuses outright, the schema refuses it by its length.
    with pytest.raises(DomainError, match=r"key 'target': too long \(600,000 characters\): CLIP reads at most 77 tokens"):
        parse_domain(DOMAIN.format(name="big", target="y" * 600_000), "big.toml")
    path = tmp_path / "big.toml"
    path.write_text(text)
    code, _, err = _run(run_cli, tmp_path, "adapt", "--domain", str(path), "--smoke")
    _one_line_error(code, err, "key 'target' is too long (10,000,000 characters)")
    _no_run_dir(tmp_path)
