"""Options declared once (pyro_ddpm.options): the flags generated from dataclass fields parse back to the values
a user typed, and what was not typed stays "not given"."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from pyro_ddpm import options
from pyro_ddpm.options import check_all, option, optional, positive
from pyro_ddpm.train import RESUMABLE, TrainConfig


@dataclass
class Settings:
    steps: int = option(10, "steps", check=positive, resumable=True)
    rate: float = option(0.5, "a rate")
    mode: str = option("fast", "how", choices=["fast", "slow"])
    limit: int | None = option(None, "at most N (default: all)", check=optional(positive))
    verbose: bool = option(False, "say more")
    figures: bool = option(True, "write no figures")
    audit: bool = option(False, "check everything", resumable=True)
    seeds: list[int] = option(help="seeds (default 0)", factory=lambda: [0])
    extras: dict = option(help="KEY=VALUE", name="--extra", shortcuts={"width": (int, "the width")}, factory=dict)


def parse(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, Settings)
    return options.given(parser.parse_args(list(argv)), Settings)


def test_nothing_typed_is_nothing_given():
    assert parse() == {}
    assert Settings(**parse()) == Settings()


def test_typed_values_come_back_with_their_types():
    got = parse("--steps", "3", "--rate", "0.25", "--mode", "slow", "--limit", "7", "--seeds", "1", "2", "3")
    assert got == {"steps": 3, "rate": 0.25, "mode": "slow", "limit": 7, "seeds": [1, 2, 3]}
    assert type(got["steps"]) is int and type(got["rate"]) is float


def test_switches_off_by_default_turn_on_and_on_by_default_turn_off():
    assert parse("--verbose") == {"verbose": True}
    assert parse("--no-figures") == {"figures": False}
    with pytest.raises(SystemExit):
        parse("--figures")  # a field that is on by default offers only its --no- switch


def test_a_resumable_switch_can_be_turned_on_and_off():
    assert parse("--audit") == {"audit": True}
    assert parse("--no-audit") == {"audit": False}


def test_key_value_pairs_are_read_as_numbers_booleans_none_or_text():
    got = parse("--extra", "a=1", "--extra", "b=2.5", "--extra", "c=true", "--extra", "d=none", "--extra", "e=x=y")
    assert got == {"extras": {"a": 1, "b": 2.5, "c": True, "d": None, "e": "x=y"}}


def test_a_bad_key_value_item_names_the_declared_flag():
    with pytest.raises(ValueError, match=r"^--extra expects KEY=VALUE, got 'width'$"):
        parse("--extra", "width")
    with pytest.raises(ValueError, match="--extra expects KEY=VALUE"):
        parse("--extra", "=3")


def test_a_shortcut_sets_its_key_beside_the_others_and_refuses_the_same_key_twice():
    assert parse("--width", "4", "--extra", "depth=2") == {"extras": {"depth": 2, "width": 4}}
    with pytest.raises(ValueError, match="--width and --extra width=... both set width"):
        parse("--width", "4", "--extra", "width=8")


def test_checks_name_the_field_or_its_flag():
    with pytest.raises(ValueError, match=r"^steps must be a positive integer, got 0$"):
        check_all(Settings(steps=0))
    with pytest.raises(ValueError, match=r"^--limit must be a positive integer, got -1$"):
        check_all(Settings(limit=-1), as_flags=True)
    with pytest.raises(ValueError, match=r"unknown mode 'medium'; choose one of \['fast', 'slow'\]"):
        check_all(Settings(mode="medium"))  # a fixed list of choices checks the Python API too
    check_all(Settings(limit=None))


def test_help_quotes_the_declared_default_or_the_note():
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, Settings, note=lambda field: "from the note" if field == "rate" else None)
    text = " ".join(parser.format_help().split())
    assert "steps (default 10)" in text and "a rate (from the note)" in text
    assert "at most N (default: all)" in text  # a None default: the help says what it means
    assert "--extra KEY=VALUE" in text and "--width WIDTH" in text


def test_the_resume_rule_is_read_from_the_fields():
    assert options.resumable(Settings) == ("steps", "audit")
    assert RESUMABLE == ("steps", "device", "log_every", "sample_every", "checkpoint_every", "validate", "threads")


def test_every_training_setting_has_a_flag_and_comes_back():
    """Each TrainConfig field is reachable from the command line: typed, it is given; not typed, it is not."""
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, TrainConfig)
    argv = ["--steps", "5", "--lr", "0.001", "--model-option", "clip_denoised=true", "--ch", "8", "--validate"]
    got = options.given(parser.parse_args(argv), TrainConfig)
    assert got == {
        "steps": 5,
        "lr": 0.001,
        "model_options": {"clip_denoised": True},
        "net_overrides": {"ch": 8},
        "validate": True,
    }
    config = TrainConfig(**got)
    assert (config.steps, config.lr, config.net_overrides, config.batch_size) == (5, 0.001, {"ch": 8}, 128)
    flags = {a.dest for a in parser._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seed", "x", "seed must be an integer"),
        ("seed", 1.5, "seed must be an integer"),
        ("net_overrides", [1], "net_overrides must be a dict"),
        ("lr", float("nan"), "lr must be a positive number"),
        ("precision", "fp16", "unknown precision 'fp16'"),
    ],
)
def test_training_settings_are_checked_by_their_declarations(field, value, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value}).check()
