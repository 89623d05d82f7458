"""Flag overrides (`--set`, `--clip`) and the graceful Ctrl-C handler."""

import os
import signal

import pytest

from ipltool.commands.overrides import apply_flags, parse_clips, parse_sets, parse_value
from ipltool.domain import load_domain
from ipltool.errors import UsageError
from ipltool.interrupt import graceful_stop


def test_values_are_read_as_toml_else_as_text():
    assert parse_value("0.995") == 0.995 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value('"a photo of a"') == "a photo of a" and parse_value("ViT-B/32") == "ViT-B/32"
    assert parse_sets(["adapt.ema=0.995", "ctx_init = a picture of a"]) == {"adapt.ema": 0.995, "ctx_init": "a picture of a"}
    with pytest.raises(UsageError, match="expected KEY=VALUE"):
        parse_sets(["adapt.ema"])


def test_clip_flags_build_the_clip_list():
    assert parse_clips(None) is None
    assert parse_clips(["ViT-B/32", "ViT-B/16:openai=0.5"]) == [
        {"model": "ViT-B/32"},
        {"model": "ViT-B/16", "pretrained": "openai", "weight": 0.5},
    ]
    domain = apply_flags(load_domain("disney"), None, None, ["ViT-B/32", "ViT-B/16=0.5"], {})
    assert [(c.model, c.weight) for c in domain.clip] == [("ViT-B/32", 1.0), ("ViT-B/16", 0.5)]


def test_layers_apply_in_order_smoke_then_set_then_named_flags():
    domain = apply_flags(
        load_domain("disney"), {"adapt.steps": 3, "adapt.batch": 2}, ["adapt.steps=4", "adapt.batch=5"], None, {"adapt.steps": ("--steps", 7)}
    )
    assert domain.adapt.steps == 7 and domain.adapt.batch == 5


def test_first_signal_asks_to_stop_second_aborts():
    # A shell starts background jobs with SIGINT ignored (and test runners may too):
    # start from Python's own handler so that "restored" means something.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _stop_twice()
    finally:
        signal.signal(signal.SIGINT, inherited)


def _stop_twice():
    with graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored afterwards
    with graceful_stop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
