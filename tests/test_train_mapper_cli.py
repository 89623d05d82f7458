"""`ipl train-mapper` end to end on tiny models (`--smoke`)."""

import json

import pytest
import torch

from ipltool.models.mappers import load_mapper
from ipltool.train.run import RunDir


@pytest.mark.parametrize("kind", ["mlp", "transformer-v2"])
def test_smoke_run_writes_the_run_dir(run_cli, tmp_path, kind):
    code, out, err = run_cli(
        "--device", "cpu", "train-mapper", "--domain", "disney-custom", "--smoke", "--mapper-kind", kind,
        "--out", str(tmp_path / "runs"), "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    run = RunDir.open(result["run_dir"])
    assert run.path.parent == tmp_path / "runs" and run.path.name.startswith("disney-custom-")
    config = run.read_config()
    assert config["mapper"]["kind"] == kind and config["generator"] == "tiny" and config["run"]["smoke"] is True
    assert len(config["prompts"]["custom"]) == 50
    log = run.read_log()
    assert [r["step"] for r in log] == [1, 2, 3]
    assert {"loss", "contrastive", "target_reg", "custom_reg", "seconds"} <= set(log[0])
    mapper, ckpt = load_mapper(run.mapper_path)  # rebuilt from the checkpoint alone
    assert ckpt["kind"] == kind and mapper.kind == kind
    out_p = mapper(torch.randn(2, ckpt["init_args"]["latent_dim"]))
    assert out_p.shape == (2, ckpt["init_args"]["n_ctx"], ckpt["init_args"]["dim"])


def test_flags_override_domain_keys(run_cli, tmp_path):
    code, out, err = run_cli(
        "train-mapper", "--domain", "disney", "--smoke", "--steps", "2", "--lr", "0.01", "--seed", "9",
        "--out", str(tmp_path), "--json",
    )
    # Named flags apply after --smoke's own settings, so they win.
    assert code == 0, err
    run = RunDir.open(json.loads(out)["run_dir"])
    config = run.read_config()
    assert config["mapper"]["lr"] == 0.01 and config["mapper"]["seed"] == 9 and config["mapper"]["steps"] == 2
    assert [r["step"] for r in run.read_log()] == [1, 2]


def test_bad_input_is_a_one_line_error(run_cli, tmp_path):
    code, _, err = run_cli("train-mapper", "--domain", "nope", "--smoke", "--out", str(tmp_path))
    assert code == 2 and "unknown domain 'nope'" in err and "Traceback" not in err
    code, _, err = run_cli("train-mapper", "--domain", "disney", "--smoke", "--mapper-kind", "resnet", "--out", str(tmp_path))
    assert code == 2 and "unknown mapper 'resnet'" in err
    code, _, err = run_cli("train-mapper", "--domain", "disney", "--out", str(tmp_path))
    assert code == 2 and "not in the cache" in err  # real runs need real weights, and say so
    assert not list(tmp_path.iterdir())  # nothing half-made
