"""`--compile`: stage 1's renders and CLIP image encodings through torch.compile, on the tiny models."""

import contextlib
import json
import os
from pathlib import Path

import torch

from ipltool.compiled import compiled_renders
from ipltool.train import stage1_run
from ipltool.train.run import RunDir


def test_compiled_renders_match_eager_and_keep_their_code_in_ipls_cache(stage2_models, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test
    source, clip, _, _ = stage2_models
    torch.manual_seed(0)
    w = source.to_w_plus([source.mapping(torch.randn(2, source.style_dim))])
    noise = source.draw_noise(2)
    graphs = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        images = source.synthesis(w, noise)
        features = clip.encode_image(images)
        with compiled_renders(source, [clip]):
            assert "synthesis" in vars(source) and "encode_image" in vars(clip.model)
            compiled_images = source.synthesis(w, noise)
            compiled_features = clip.encode_image(compiled_images)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo compiled graphs: not a silent eager fallback
    assert "synthesis" not in vars(source) and "encode_image" not in vars(clip.model)  # the methods are back
    torch.testing.assert_close(compiled_images, images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled_features, features, rtol=1e-4, atol=1e-5)
    cache = Path(os.environ["IPL_CACHE"]) / "inductor"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache) and any(cache.rglob("*"))  # kept for later runs


def test_the_compile_flag_compiles_stage_one_of_both_commands(run_cli, tmp_path, monkeypatch):
    entered = []

    @contextlib.contextmanager
    def recorded(generator, clips):
        entered.append((generator.n_latent, len(clips)))
        yield  # eager: the compilation itself is the test above

    monkeypatch.setattr(stage1_run, "compiled_renders", recorded)
    base = ["--device", "cpu", "train-mapper", "--domain", "disney", "--smoke", "--steps", "1", "--out", str(tmp_path), "--json"]
    code, out, err = run_cli(*base)
    assert code == 0, err
    assert entered == []  # off by default
    code, out, err = run_cli(*base, "--compile")
    assert code == 0, err
    assert len(entered) == 1 and (RunDir.open(json.loads(out)["run_dir"]).mapper_path).is_file()
    code, out, err = run_cli("--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--compile", "--out", str(tmp_path), "--json")
    assert code == 0, err
    assert len(entered) == 2


def test_the_help_of_both_commands_offers_the_flag(run_cli):
    for command in ("train-mapper", "adapt"):
        code, out, _ = run_cli(command, "--help")
        assert code == 0 and "--compile" in out and "torch.compile" in out


def test_inductor_keeps_its_code_in_ipls_cache_unless_the_user_chose_a_folder(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from ipltool.compiled import inductor_cache

    ours = Path(os.environ["IPL_CACHE"]) / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch._dynamo writes there
    assert inductor_cache() == ours and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(ours)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert inductor_cache() == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache() == tmp_path / "mine"  # the user's choice stands


def test_a_failing_compiler_ends_the_run_with_one_line_that_says_what_to_do(run_cli, tmp_path, monkeypatch):
    from torch._dynamo.exc import BackendCompilerFailed

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise BackendCompilerFailed(None, RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)

        return call

    monkeypatch.setattr(torch, "compile", broken)
    code, out, err = run_cli("--device", "cpu", "train-mapper", "--domain", "disney", "--smoke", "--compile", "--out", str(tmp_path))
    assert code == 1
    assert "--compile: torch.compile failed" in err and "No working C++ compiler" in err and "run without --compile" in err
    assert "Traceback" not in err


def test_compile_without_a_stage_one_says_it_does_nothing(run_cli, tmp_path, monkeypatch):
    entered = []
    monkeypatch.setattr(stage1_run, "compiled_renders", lambda *args: entered.append(args) or contextlib.nullcontext())
    code, out, err = run_cli(
        "--device", "cpu", "adapt", "--domain", "disney", "--smoke", "--compile", "--set", 'adapt.method="nada"', "--out", str(tmp_path),
    )
    assert code == 0, err
    assert "--compile does nothing here: method nada has no stage 1" in err and entered == []
