"""Mistakes get the answer a person needs: close names suggested, flags named, every problem listed, text printed as is."""

from __future__ import annotations

import pytest

from ipltool.errors import DomainError, IplError, UnknownNameError, UsageError, did_you_mean, unknown_name

MINIMAL = 'name = "x"\nsource = "photo"\ntarget = "sketch"\ngenerator = "tiny"\n'


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------
# Did you mean


def test_did_you_mean_suggests_the_closest_name_or_nothing():
    assert did_you_mean("diseny", ["disney", "pixar-character"]) == " — did you mean 'disney'?"
    assert did_you_mean("Disney", ["disney"]) == " — did you mean 'disney'?"  # case does not hide a match
    assert did_you_mean("zzz", ["disney"]) == ""
    assert did_you_mean("disney", ["disney"]) == ""  # never "did you mean" the name itself
    error = unknown_name("domain", "diseny", ["disney", "zombie"], label="known domains", hint="or a path", error=DomainError)
    assert isinstance(error, DomainError) and error.exit_code == 2
    assert error.message == "unknown domain 'diseny' — did you mean 'disney'?"
    assert error.hint == "known domains: disney, zombie; or a path"
    assert unknown_name("mapper", "resnet", [], label="installed").hint == "installed: none"


@pytest.mark.parametrize(
    "args, first_line, hint_start",
    [
        (("adapt", "-d", "diseny", "--smoke"), "error: unknown domain 'diseny' — did you mean 'disney'?", "hint: known domains: anime-painting, disney,"),
        (("prompts", "show", "diseny"), "error: unknown domain 'diseny' — did you mean 'disney'?", "hint: known domains: "),
        (("train-mapper", "-d", "disney", "--smoke", "--mapper-kind", "mpl"), "error: unknown mapper 'mpl' — did you mean 'mlp'?", "hint: installed: mlp, transformer-v2;"),
        (("fetch", "stylegan2-ffhq-1204"), "error: unknown model 'stylegan2-ffhq-1204' — did you mean 'stylegan2-ffhq-1024'?", "hint: known: tiny, stylegan2-ffhq-1024,"),
        (("eval", "nowhere", "--metrics", "clip,isc"), "error: unknown metric 'isc' — did you mean 'is'?", "hint: choose from: is, fid, kid,"),
        (("eval", "nowhere", "--scs-edge", "sobol"), "error: --scs-edge must be hed or sobel, not 'sobol' — did you mean 'sobel'?", None),
        (("eval", "nowhere", "--id-backbone", "arcfase"), "error: --id-backbone must be dlib or arcface, not 'arcfase' — did you mean 'arcface'?", None),
        (("adapt", "-d", "disney", "--smoke", "--precision", "fp61"), "error: invalid precision 'fp61' — did you mean 'fp16'?", "hint: use fp32, bf16, fp16"),
        (("--device", "cdua", "prompts", "list"), "error: invalid device 'cdua' — did you mean 'cuda'?", "hint: use auto, cpu"),
    ],
)
def test_a_misspelled_name_gets_the_close_one_then_the_list(run_cli, tmp_path, args, first_line, hint_start):
    code, _, err = run_cli(*args, *(["--out", str(tmp_path / "runs")] if args[0] in ("adapt", "train-mapper") else []))
    lines = _lines(err)
    assert code == 2 and first_line in lines and "Traceback" not in err, err
    if hint_start:
        assert lines[lines.index(first_line) + 1].startswith(hint_start), err
    assert not (tmp_path / "runs").exists()


def test_two_misspelled_metrics_each_get_their_suggestion(run_cli):
    code, _, err = run_cli("eval", "nowhere", "--metrics", "isc,fdi,clip")
    assert code == 2 and _lines(err)[0] == "error: unknown metric 'isc' — did you mean 'is'?; unknown metric 'fdi' — did you mean 'fid'?"
    code, _, err = run_cli("eval", "nowhere", "--metrics", ",")
    assert code == 2 and _lines(err)[0] == "error: --metrics names no metric (got ',')"


def test_stylize_names_encoder_faces_and_paste_mask(run_cli, tmp_path):
    from PIL import Image

    photo = tmp_path / "face.png"
    Image.new("RGB", (64, 64), "grey").save(photo)
    out = str(tmp_path / "out")
    code, _, err = run_cli("stylize", str(photo), "--smoke", "--encoder", "e5e", "--out", out)
    assert code == 2 and _lines(err)[0] == "error: unknown encoder 'e5e' — did you mean 'e4e'?"
    assert _lines(err)[1].startswith("hint: installed: e4e, psp, restyle-e4e, restyle-psp;")
    code, _, err = run_cli("stylize", str(photo), "--smoke", "--faces", "larg", "--out", out)
    assert code == 2 and _lines(err) == ["error: --faces must be largest or all, not 'larg' — did you mean 'largest'?"]
    code, _, err = run_cli("stylize", str(photo), "--smoke", "--paste-mask", "elipse", "--out", out)
    assert code == 2 and _lines(err) == ["error: --paste-mask must be square or ellipse, not 'elipse' — did you mean 'ellipse'?"]


def test_library_names_suggest_too():
    from ipltool import registry
    from ipltool.domain import parse_domain
    from ipltool.invert.align import alignment_sizes, paste_mask
    from ipltool.kernels.dispatch import kernel_choice

    with pytest.raises(UnknownNameError) as info:
        registry.plugins("mapper")
    assert info.value.message == "unknown plugin kind 'mapper' — did you mean 'mappers'?"
    assert info.value.hint == "kinds: mappers, encoders, domains"
    with pytest.raises(UnknownNameError, match="^unknown alignment preset 'ffqh' — did you mean 'ffhq'\\?$"):
        alignment_sizes("ffqh")
    import numpy as np

    with pytest.raises(UsageError, match="^unknown paste mask 'elipse' — did you mean 'ellipse'\\?$"):
        paste_mask(np.zeros(2), np.zeros(2), mask="elipse")
    with pytest.raises(UsageError, match="^unknown kernel implementation 'natve' \\(from the call\\) — did you mean 'native'\\?$"):
        kernel_choice("natve")
    with pytest.raises(DomainError) as info:
        parse_domain(MINIMAL.replace('"tiny"', '"stylegan2-ffhq-1204"'), "g.toml")
    assert info.value.message.startswith("g.toml:4: key 'generator': unknown generator 'stylegan2-ffhq-1204' — did you mean 'stylegan2-ffhq-1024'? (known: tiny,")


# ----------------------------------------------------------------------------
# CLIP model names: the same check with and without --smoke


@pytest.mark.parametrize("smoke", [True, False])
@pytest.mark.parametrize("command", ["adapt", "train-mapper"])
def test_clip_names_are_checked_with_and_without_smoke(run_cli, tmp_path, command, smoke):
    out = tmp_path / "runs"
    extra = ["--smoke"] if smoke else []
    code, _, err = run_cli("--device", "cpu", command, "-d", "disney", *extra, "--clip", "ViT-B/23", "--out", str(out))
    assert code == 2 and "error: unknown CLIP architecture 'ViT-B/23' — did you mean 'ViT-B-32'?" in _lines(err), err
    code, _, err = run_cli("--device", "cpu", command, "-d", "disney", *extra, "--clip", "ViT-B/32:opnai", "--out", str(out))
    assert code == 2 and "error: unknown CLIP weights 'opnai' for ViT-B-32 (neither a known tag nor a file) — did you mean 'openai'?" in _lines(err)
    for empty in ("", ":openai", " =0.5"):
        code, _, err = run_cli("--device", "cpu", command, "-d", "disney", *extra, "--clip", empty, "--out", str(out))
        assert code == 2 and f"error: --clip {empty!r}: no model name" in _lines(err), err
    assert not out.exists()  # refused before any run directory


def test_clip_names_in_domain_files_and_eval_are_checked(run_cli, tmp_path):
    from ipltool.models.clip import TINY_MODEL, check_model_name

    assert check_model_name("ViT-B/32") == "ViT-B-32" and check_model_name("ViT-B-16") == "ViT-B-16"
    assert check_model_name("tiny") == TINY_MODEL and check_model_name("hf-hub:org/model") == "hf-hub:org/model"
    with pytest.raises(UsageError, match="empty CLIP model name"):
        check_model_name("hf-hub:")
    bad = tmp_path / "bad-clip.toml"
    bad.write_text(MINIMAL + '[[clip]]\nmodel = "ViT-X/99"\n')
    code, _, err = run_cli("--device", "cpu", "adapt", "-d", str(bad), "--smoke", "--out", str(tmp_path / "runs"))
    assert code == 2 and _lines(err)[-2].startswith("error: unknown CLIP architecture 'ViT-X/99'") and not (tmp_path / "runs").exists()
    empty = tmp_path / "empty-clip.toml"
    empty.write_text(MINIMAL + '[[clip]]\nmodel = ""\n')
    code, out, _ = run_cli("prompts", "validate", str(empty))
    assert code == 2 and _lines(out) == [f"error {empty}:6: key 'clip.0.model': string should have at least 1 character (got '')"]
    for smoke in (["--smoke"], []):
        code, _, err = run_cli("eval", "nowhere", *smoke, "--clip", "ViT-B/23")
        assert code == 2 and _lines(err)[0] == "error: unknown CLIP architecture 'ViT-B/23' — did you mean 'ViT-B-32'?", err


@pytest.mark.parametrize("value", ["-1", "nan", "5", "inf", "1.0001"])
def test_eval_truncation_outside_0_1_is_refused(run_cli, tmp_path, value):
    code, _, err = run_cli("eval", "nowhere", "--truncation", value, "--report", str(tmp_path / "r"))
    assert code == 2 and _lines(err)[0] == f"error: --truncation must be a number in [0, 1] (got {float(value)})", err
    assert not (tmp_path / "r").exists()  # refused before anything is written


# ----------------------------------------------------------------------------
# Named flags speak in their own words; --set keeps the key


@pytest.mark.parametrize(
    "command, flag, value, message",
    [
        ("adapt", "--steps", "-5", "--steps must be ≥ 1 (got -5)"),
        ("adapt", "--lr", "0", "--lr must be > 0 (got 0.0)"),
        ("adapt", "--batch", "0", "--batch must be ≥ 1 (got 0)"),
        ("adapt", "--layers", "0", "--layers must be ≥ 1 (got 0)"),
        ("adapt", "--sample-every", "0", "--sample-every must be ≥ 1 (got 0)"),
        ("adapt", "--sample-size", "2000", "--sample-size must be ≤ 1024 (got 2000)"),
        ("adapt", "--method", "nad", "--method must be 'ipl' or 'nada' (got 'nad') — did you mean 'nada'?"),
        ("train-mapper", "--steps", "0", "--steps must be ≥ 1 (got 0)"),
        ("train-mapper", "--batch", "1", "--batch must be ≥ 2 (got 1)"),
        ("train-mapper", "--lr", "-1", "--lr must be > 0 (got -1.0)"),
    ],
)
def test_a_bad_named_flag_is_reported_as_the_flag(run_cli, tmp_path, command, flag, value, message):
    out = tmp_path / "runs"
    code, _, err = run_cli("--device", "cpu", command, "-d", "disney", "--smoke", flag, value, "--out", str(out))
    assert code == 2 and _lines(err) == [f"error: {message}"], err
    assert not out.exists()


def test_set_keeps_the_key_form_and_wins_over_nothing(run_cli, tmp_path):
    code, _, err = run_cli("--device", "cpu", "adapt", "-d", "disney", "--smoke", "--set", "adapt.steps=-5", "--out", str(tmp_path / "runs"))
    assert code == 2 and _lines(err) == ["error: override: key 'adapt.steps': input should be greater than or equal to 1 (got -5)"]
    # A value that --set got right and the named flag got wrong is the flag's fault.
    code, _, err = run_cli(
        "--device", "cpu", "adapt", "-d", "disney", "--smoke", "--set", "adapt.steps=4", "--steps", "0", "--out", str(tmp_path / "runs")
    )
    assert code == 2 and _lines(err) == ["error: --steps must be ≥ 1 (got 0)"]


def test_resume_names_flags_too(run_cli, tmp_path):
    from ipltool.domain import load_domain
    from ipltool.train.run import RunDir

    run = RunDir.create(tmp_path / "runs", "disney", {**load_domain("disney").to_toml_dict(), "run": {"stage": "adapt", "smoke": True}})
    code, _, err = run_cli("--device", "cpu", "adapt", "--resume", str(run.path), "--steps", "0")
    assert code == 2 and _lines(err) == ["error: --steps must be ≥ 1 (got 0)"], err
    code, _, err = run_cli("--device", "cpu", "adapt", "--resume", str(run.path), "--lr", "0.1", "--sample-every", "3")
    assert code == 2 and _lines(err)[0] == "error: --resume continues a run with its saved settings; drop --lr, --sample-every"


# ----------------------------------------------------------------------------
# Domain files: every problem, each with its line


BROKEN = 'name = "bad name"\nsource = "photo"\ntarget = ""\ngenerator = "tiny"\ncolour = 3\n[adapt]\nsteps = 0\nlr = -1\n'
PROBLEMS = [
    "{f}:1: key 'name': string should match pattern '^[A-Za-z0-9][A-Za-z0-9_.-]*$' (got 'bad name')",
    "{f}:3: key 'target': string should have at least 1 character (got '')",
    "{f}:5: unknown key 'colour'",
    "{f}:7: key 'adapt.steps': input should be greater than or equal to 1 (got 0)",
    "{f}:8: key 'adapt.lr': input should be greater than 0 (got -1)",
]


def test_every_problem_of_a_domain_file_is_listed_with_its_line(tmp_path):
    from ipltool.domain import parse_domain

    with pytest.raises(DomainError) as info:
        parse_domain(BROKEN, "bad.toml")
    assert info.value.message.splitlines() == [p.format(f="bad.toml") for p in PROBLEMS]
    assert "more problem" not in info.value.message
    # A missing key has no line: it comes last, with the file name alone.
    with pytest.raises(DomainError) as info:
        parse_domain('name = "x"\nsource = "photo"\ntarget = "t"\ncolour = 1\n', "m.toml")
    assert info.value.message.splitlines() == ["m.toml:4: unknown key 'colour'", "m.toml: missing required key 'generator'"]


def test_validate_and_adapt_show_every_problem(run_cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(BROKEN)
    expected = [p.format(f=bad) for p in PROBLEMS]
    code, out, err = run_cli("prompts", "validate", str(bad))
    assert code == 2 and _lines(out) == ["error " + expected[0], *("      " + p for p in expected[1:])], out
    code, out, _ = run_cli("prompts", "validate", "--json", str(bad))
    assert code == 2 and __import__("json").loads(out)[0]["problems"] == expected
    code, _, err = run_cli("--device", "cpu", "adapt", "-d", str(bad), "--smoke", "--out", str(tmp_path / "runs"))
    assert code == 2 and _lines(err) == [
        "error: " + expected[0],
        *("       " + p for p in expected[1:]),
        "hint: `ipl prompts show disney` prints a complete domain file",
    ], err


# ----------------------------------------------------------------------------
# Text is printed as it is: no rich markup eaten


def test_report_escapes_markup_in_message_and_hint(capsys):
    from ipltool.cli import _report

    _report(IplError("pattern '^[a-z0-9]+$' and [bold]b[/bold] [/]", hint="try [red]x[/red] or C:\\dir\\"))
    assert capsys.readouterr().err.splitlines() == [
        "error: pattern '^[a-z0-9]+$' and [bold]b[/bold] [/]",
        "hint: try [red]x[/red] or C:\\dir\\",
    ]


def test_user_text_with_brackets_survives_the_cli(run_cli, tmp_path, monkeypatch):
    code, _, err = run_cli("adapt", "-d", str(tmp_path / "x[a-z0-9][bold].toml"), "--smoke")
    assert code == 2 and _lines(err) == [f"error: {tmp_path}/x[a-z0-9][bold].toml: no such file"], err
    code, _, err = run_cli("prompts", "show", "[bold]x")
    assert code == 2 and _lines(err)[0] == "error: unknown domain '[bold]x'"
    odd = tmp_path / "odd[a-z0-9].toml"
    odd.write_text(MINIMAL.replace('"sketch"', '"a [a-z0-9] [bold]sketch"').replace('"x"', '"odd"'))
    code, out, _ = run_cli("prompts", "validate", str(odd))
    assert code == 0 and _lines(out) == [f"ok    {odd} (odd)"]
    monkeypatch.setenv("COLUMNS", "250")
    (tmp_path / "user-domains").mkdir()
    (tmp_path / "user-domains" / "odd.toml").write_text(odd.read_text())
    code, out, _ = run_cli("prompts", "list")
    assert code == 0 and "photo -> a [a-z0-9] [bold]sketch" in out


# ----------------------------------------------------------------------------
# prompts list: where a domain comes from, said once


def test_prompts_list_names_the_user_dir_once(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    (tmp_path / "user-domains").mkdir()
    (tmp_path / "user-domains" / "mine.toml").write_text(MINIMAL.replace('"x"', '"mine"'))
    code, out, _ = run_cli("prompts", "list")
    row = next(line for line in out.splitlines() if " mine " in line)
    assert code == 0 and [cell.strip() for cell in row.strip("│ ").split("│")][3] == "user dir", row
    assert "user dir: user dir" not in out and "built-in:" not in out


def test_from_label_for_every_origin(tmp_path):
    from ipltool.commands.prompts import _from_label
    from ipltool.domain import DomainEntry

    path = tmp_path / "a.toml"
    assert _from_label(DomainEntry("a", path, "user", "user dir")) == "user dir"
    assert _from_label(DomainEntry("a", path, "builtin", "ipltool")) == "built-in"
    assert _from_label(DomainEntry("a", path, "plugin", "ipl-example-plugin (example)")) == "plugin: ipl-example-plugin (example)"
    assert _from_label(DomainEntry("a", path, "path", str(path))) == f"file: {path}"


# ----------------------------------------------------------------------------
# stylize: smoke runs found but not usable are mentioned


def _finished_run(root, smoke: bool):
    from ipltool.domain import load_domain
    from ipltool.train.run import GENERATOR_NAME, RunDir

    run = RunDir.create(root, "disney", {**load_domain("disney").to_toml_dict(), "run": {"stage": "adapt", "smoke": smoke}})
    (run.path / GENERATOR_NAME).write_bytes(b"")  # planning only checks that it exists
    return run.path


def test_stylize_says_smoke_runs_were_found_and_skipped(run_cli, tmp_path):
    from PIL import Image

    photo = tmp_path / "face.png"
    Image.new("RGB", (64, 64), "grey").save(photo)
    runs = tmp_path / "runs"
    smoke_run = _finished_run(runs, smoke=True)
    code, _, err = run_cli("stylize", str(photo), "-d", "disney", "--runs", str(runs), "--out", str(tmp_path / "out"))
    assert code == 2 and _lines(err) == [
        (
            f"error: no finished `ipl adapt` run of 'disney' under {runs}: found 1 --smoke run(s) (newest {smoke_run}) and skipped them: "
            "their tiny random generators only go with --smoke"
        ),
        (
            f"hint: check the plumbing with `ipl stylize ... --domain disney --smoke` (or --smoke -g {smoke_run}); "
            "for real pictures train one with `ipl adapt --domain disney`"
        ),
    ], err
    # Without any run, the message stays as it was.
    code, _, err = run_cli("stylize", str(photo), "-d", "disney", "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert code == 2 and _lines(err)[0] == f"error: no finished `ipl adapt` run of 'disney' under {tmp_path / 'none'}"


def test_stylize_smoke_says_real_runs_were_skipped(tmp_path, capsys):
    from ipltool.invert.targets import plan_targets

    runs = tmp_path / "runs"
    _finished_run(runs, smoke=False)
    specs = plan_targets([], ["disney"], runs, smoke=True)
    assert [s.path for s in specs] == [None]  # the random stand-in
    assert _lines(capsys.readouterr().err) == [
        (
            f"--smoke: no smoke run of 'disney' under {runs}; using a random tiny stand-in "
            "(skipped 1 real run(s): --smoke renders with tiny random models only)"
        )
    ]


def test_first_line_is_never_empty_and_takes_the_first_informative_line():
    from ipltool.errors import first_line

    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(RuntimeError("\n\n  \n")) == "RuntimeError"
    assert first_line(EOFError()) == "the file ends early (truncated)"
    assert first_line(ValueError("\n  first\nsecond")) == "first"
    assert first_line(ValueError("\x1b[31mred\x1b[0m")) == "red"
