"""The one strict dataclass <-> dict reader (`common.config`): its fixed rules and each `ReadOptions` option."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from common.config import (CHECKPOINT, MAX_COUNT, CheckpointError, ReadOptions, config_to_dict, dataclass_from_dict,
                           yaml_options)


class UserError(ValueError):
    pass


@dataclass(frozen=True)
class Stage:
    enabled: bool = True
    threshold: float = 0.5
    model: str | None = None


@dataclass(frozen=True)
class Rules:
    min_side: int = 64
    max_side: int = 0


@dataclass(frozen=True)
class Job:
    n_layers: int = 2
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    taps: tuple[int, ...] = (0, 3)
    seed: int | None = None
    stage: Stage = field(default_factory=Stage)
    rules: Rules = field(default_factory=Rules)

    def __post_init__(self) -> None:
        if self.lr > 1:
            raise ValueError(f"lr: {self.lr} is above 1")


@dataclass(frozen=True)
class Required:
    dim: int
    name: str = "x"


FULL = {"n_layers": 2, "lr": 0.1, "betas": [0.9, 0.99], "taps": [0, 3], "seed": None,
        "stage": {"enabled": True, "threshold": 0.5, "model": None}, "rules": {"min_side": 64, "max_side": 10}}
YAML = yaml_options(UserError)


def _message(cls, d, opts=CHECKPOINT, where="f.json") -> str:
    with pytest.raises(opts.error) as e:
        dataclass_from_dict(cls, d, where, opts)
    return str(e.value)


def test_round_trip_through_config_to_dict_and_yaml():
    cfg = dataclass_from_dict(Job, FULL, "f.json")
    assert cfg.betas == (0.9, 0.99) and cfg.stage == Stage() and cfg.rules.max_side == 10
    d = config_to_dict(cfg)
    assert d == FULL and isinstance(d["betas"], list)
    assert dataclass_from_dict(Job, yaml.safe_load(yaml.safe_dump(d)), "f.yaml", YAML) == cfg  # tuples dump as lists
    assert config_to_dict({"a": (1, Stage())}) == {"a": [1, {"enabled": True, "threshold": 0.5, "model": None}]}


def test_unknown_keys_name_the_file_dotted_key_and_known_keys_under_every_option():
    for opts in (CHECKPOINT, YAML):
        assert _message(Job, {**FULL, "stage": {"treshold": 1}}, opts) == (
            "f.json: unknown key stage.treshold (known in stage: ['enabled', 'model', 'threshold'])")
    assert _message(Job, {**FULL, "a": 1, "b": 2}).startswith("f.json: unknown keys a, b (known in the top level:")


def test_wrong_types_are_refused_with_file_and_dotted_key():
    cases = [({"n_layers": "2"}, "f.json: n_layers: expected an integer, got str '2'"),
             ({"n_layers": True}, "f.json: n_layers: expected an integer, got bool True"),
             ({"stage": {"enabled": "no"}}, "f.json: stage.enabled: expected true or false, got 'no'"),
             ({"stage": {"model": 3}}, "f.json: stage.model: expected a string, got int 3"),
             ({"stage": [1]}, "f.json: stage: expected an object, got list"),
             ({"taps": [0, "x"]}, "f.json: taps[1]: expected an integer, got str 'x'"),
             ({"betas": [0.9]}, "f.json: betas: expected a list of 2 values, got 1: [0.9]"),
             ({"lr": float("inf")}, "f.json: lr: inf is not finite")]
    for edit, message in cases:
        assert _message(Job, {**FULL, **edit}, YAML, "f.json") == message


def test_the_configs_own_checks_are_wrapped_with_the_location_in_the_chosen_error():
    assert _message(Job, {**FULL, "lr": 2.0}) == "f.json: lr: 2.0 is above 1"
    assert _message(Job, {"lr": 2.0}, YAML, "run.yaml") == "run.yaml: lr: 2.0 is above 1"


def test_default_sections_option_and_missing_keys():
    assert _message(Required, {}) == "f.json: missing key dim (known in the top level: ['dim', 'name'])"
    assert dataclass_from_dict(Required, {"dim": 4}, "f.json") == Required(4)  # a key with a default may be absent
    partial = {k: v for k, v in FULL.items() if k != "rules"}
    assert _message(Job, partial) == "f.json: missing the 'rules' section"  # a truncated checkpoint
    assert dataclass_from_dict(Job, {"stage": {"threshold": 0.7}}, "f.yaml", YAML) == Job(stage=Stage(threshold=0.7))
    assert dataclass_from_dict(Job, {}, "f.yaml", YAML) == Job()
    with pytest.raises(UserError, match="f.yaml: missing key dim"):  # no default to take
        dataclass_from_dict(Required, {}, "f.yaml", YAML)


def test_null_section_option():
    assert _message(Job, {**FULL, "stage": None}) == "f.json: stage: expected an object, got NoneType"
    assert dataclass_from_dict(Job, {"stage": None, "rules": None}, "f.yaml", YAML) == Job()
    off = dataclass_from_dict(Job, {"stage": None, "rules": None}, "f.yaml", yaml_options(UserError, "disabled"))
    assert off.stage == Stage(enabled=False) and off.rules == Rules()  # a section without 'enabled' keeps defaults
    assert dataclass_from_dict(Job, {"seed": None}, "f.yaml", YAML).seed is None  # an optional value, not a section
    with pytest.raises(ValueError, match="null_section: 'off' is not error"):
        ReadOptions(null_section="off")


def test_number_strings_option():
    assert dataclass_from_dict(Job, {"lr": "3e-4"}, "f.yaml", YAML).lr == 3e-4
    assert dataclass_from_dict(Job, {"stage": {"threshold": "1e-1"}}, "f.yaml", YAML).stage.threshold == 0.1
    assert _message(Job, {"lr": "fast"}, YAML, "f.yaml") == "f.yaml: lr: expected a number, got str 'fast'"
    assert _message(Job, {"lr": "nan"}, YAML, "f.yaml") == "f.yaml: lr: nan is not finite"
    assert _message(Job, {**FULL, "lr": "3e-4"}) == "f.json: lr: expected a number, got str '3e-4'"
    assert _message(Job, {"n_layers": "2"}, YAML) == "f.json: n_layers: expected an integer, got str '2'"  # floats only


def test_bounds_option():
    assert _message(Job, {**FULL, "n_layers": MAX_COUNT + 1}) == (
        f"f.json: n_layers: {MAX_COUNT + 1} is outside [1, {MAX_COUNT}]")
    assert _message(Job, {**FULL, "rules": {"min_side": 64, "max_side": 0}}) == (
        "f.json: rules.max_side: 0 is outside [1, 16777216]")
    assert dataclass_from_dict(Job, {**FULL, "seed": 0, "taps": [0]}, "f.json").seed == 0  # seeds and indices >= 0
    relaxed = dataclass_from_dict(Job, {"n_layers": MAX_COUNT + 1, "rules": {"max_side": 0}}, "f.yaml", YAML)
    assert relaxed.n_layers == MAX_COUNT + 1 and relaxed.rules.max_side == 0


def test_error_option_and_key_of_a_nested_read():
    with pytest.raises(UserError) as e:
        dataclass_from_dict(Job, {"rules": {"min_side": "big"}}, "c.yaml", YAML)
    assert not isinstance(e.value, CheckpointError) and str(e.value) == (
        "c.yaml: rules.min_side: expected an integer, got str 'big'")
    assert _message(Stage, {"model": 1}, ReadOptions(error=UserError, default_sections=True), "c.json") == (
        "c.json: model: expected a string, got int 1")
    with pytest.raises(CheckpointError) as e:
        dataclass_from_dict(Required, {"dim": 4, "typo": 1}, "config.json", key="rope_scaling")
    assert str(e.value).startswith("config.json: unknown key rope_scaling.typo (known in rope_scaling: ")
