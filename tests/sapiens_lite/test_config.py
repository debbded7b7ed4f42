"""Typed configs (sapiens_lite/config.py): defaults < YAML files < `a.b=value` overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from sapiens_lite.config import (
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)
from sapiens_lite.errors import ConfigError, UserError


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: int | None = None


@dataclass
class Model:
    arch: str = "vit_test"
    depth: int = 2
    img_size: tuple[int, int] = (64, 48)
    layers: list[int] = field(default_factory=lambda: [1, 2])
    extra: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1, got {self.depth}")


@dataclass
class Run:
    name: str = "run"
    seed: int = 0
    amp: bool = True
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)


def write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_defaults_then_files_in_order_then_overrides(tmp_path):
    assert load_config(Run) == Run()
    a = write(tmp_path, "a.yaml", "seed: 1\nmodel:\n  depth: 4\n  arch: vit_small\n")
    b = write(tmp_path, "b.yaml", "seed: 2\noptim:\n  schedule: linear\n")
    cfg = load_config(Run, [a, b], ["model.depth=8", "name=x"])
    assert cfg.seed == 2  # the later file wins
    assert cfg.model.depth == 8  # the override wins over the file
    assert cfg.model.arch == "vit_small"  # set only in a file
    assert cfg.optim.schedule == "linear" and cfg.name == "x"
    assert cfg.optim.lr == 1e-3 and cfg.model.img_size == (64, 48)  # untouched defaults stay
    assert isinstance(cfg.model, Model) and isinstance(cfg.optim, Optim)


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'model\.dpth'; valid keys here: .*arch, depth"
    ):
        load_config(Run, [], ["model.dpth=3"])
    f = write(tmp_path, "bad.yaml", "optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'optim\.lrr'.*betas, lr, schedule"):
        load_config(Run, [f])
    with pytest.raises(UserError):  # the CLI turns it into one line + exit 2
        load_config(Run, [], ["nope=1"])


def test_wrong_types_are_errors_naming_the_key():
    for override, pattern in [
        ("seed=abc", r"seed: expected an integer, got 'abc'"),
        ("seed=1.5", r"seed: expected an integer"),
        ("amp=3", r"amp: expected true/false, got 3"),
        ("model.depth=true", r"model\.depth: expected an integer, got True"),  # bool is not an int
        ("name=[1]", r"name: expected a string"),
        ("model.layers=[1, x]", r"model\.layers\[1\]: expected an integer, got 'x'"),
        ("model=3", r"model: expected a mapping of Model fields"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_config(Run, [], [override])


def test_literal_error_lists_the_choices():
    with pytest.raises(
        ConfigError, match=r"optim\.schedule: 'step' is not a valid choice; .*'cosine', 'linear', 'constant'"
    ):
        load_config(Run, [], ["optim.schedule=step"])


def test_tuples_lists_dicts_and_optional():
    cfg = load_config(Run, [], ["model.img_size=[1024, 768]", "optim.betas=[0.9, 0.999]", "model.layers=[3]"])
    assert cfg.model.img_size == (1024, 768) and isinstance(cfg.model.img_size, tuple)
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.model.layers == [3]
    with pytest.raises(ConfigError, match=r"model\.img_size: expected 2 values, got 3"):
        load_config(Run, [], ["model.img_size=[1, 2, 3]"])
    cfg = load_config(Run, [], ["model.extra={a: 1, b: 2.5}", "optim.warmup=5"])
    assert cfg.model.extra == {"a": 1.0, "b": 2.5} and isinstance(cfg.model.extra["a"], float)
    assert cfg.optim.warmup == 5
    assert load_config(Run, [], ["optim.warmup=null"]).optim.warmup is None
    assert load_config(Run, [], ["optim.lr=1"]).optim.lr == 1.0  # int -> float
    assert isinstance(load_config(Run, [], ["optim.lr=1"]).optim.lr, float)


def test_nested_section_as_a_whole_keeps_other_defaults(tmp_path):
    f = write(tmp_path, "n.yaml", "model: {depth: 3}\n")
    cfg = load_config(Run, [f], ["model={arch: vit_base}"])
    assert cfg.model == Model(arch="vit_base", depth=3)


def test_post_init_errors_become_config_errors():
    with pytest.raises(ConfigError, match=r"model: depth must be >= 1, got 0"):
        load_config(Run, [], ["model.depth=0"])


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(
        Run, [], ["model.img_size=[32, 16]", "optim.warmup=7", "model.extra={k: 0.5}", "amp=false"]
    )
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert not list(path.parent.glob("*.tmp"))
    assert load_config(Run, [path]) == cfg
    d = config_to_dict(cfg)
    assert d["model"]["img_size"] == [32, 16]  # plain lists for YAML / JSON
    assert config_from_dict(Run, d) == cfg
    assert config_from_dict(Run, {"seed": 3}) == Run(seed=3)  # partial dicts fill from defaults


def test_override_parsing():
    assert parse_overrides(["a.b=[1,2]", "c=x", "--d.e.f=3", "g="]) == {
        "a": {"b": [1, 2]},
        "c": "x",
        "d": {"e": {"f": 3}},
        "g": "",
    }
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        parse_overrides(["model.depth"])
    with pytest.raises(ConfigError, match="is not a section"):
        parse_overrides(["a=1", "a.b=2"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["a=[1"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["=3"])


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        load_config(Run, [tmp_path / "missing.yaml"])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, [write(tmp_path, "list.yaml", "- 1\n- 2\n")])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, [write(tmp_path, "broken.yaml", "a: [1\n")])
    assert load_config(Run, [write(tmp_path, "empty.yaml", "")]) == Run()


def test_scientific_notation_without_a_dot_is_a_float(tmp_path):
    assert load_config(Run, [], ["optim.lr=5e-4"]).optim.lr == 5e-4
    assert load_config(Run, [write(tmp_path, "lr.yaml", "optim:\n  lr: 1e-3\n")]).optim.lr == 1e-3


@dataclass
class Engine:
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 0

    def __post_init__(self):
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ValueError("precision='bf16' needs zero_stage >= 1")


@dataclass
class Trainer:
    engine: Engine = field(default_factory=Engine)
    data_size: int = 64
    model: Model = field(default_factory=Model)
    seen: tuple[str, ...] = ()

    def finalize(self, explicit: frozenset[str]) -> Trainer:
        # record what the user set, so the test can see finalize's input
        return Trainer(self.engine, self.data_size, self.model, tuple(sorted(explicit)))


def test_checks_run_once_on_the_merged_config(tmp_path):
    """A cross-field check sees the final values: the first file alone would fail it, the merge does not."""
    a = write(tmp_path, "a.yaml", "engine: {precision: bf16}\n")
    b = write(tmp_path, "b.yaml", "engine: {zero_stage: 2}\n")
    cfg = load_config(Trainer, [a, b])
    assert cfg.engine == Engine("bf16", 2)
    cfg = load_config(Trainer, [a], ["engine.zero_stage=1"])
    assert cfg.engine == Engine("bf16", 1)
    with pytest.raises(ConfigError, match="needs zero_stage"):
        load_config(Trainer, [a])
    # The file is still named when one layer holds an unknown key, before any merge.
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'engine\.stage'"):
        load_config(Trainer, [a, write(tmp_path, "c.yaml", "engine: {stage: 2}\n")])


def test_finalize_gets_the_keys_the_user_set(tmp_path):
    a = write(tmp_path, "a.yaml", "model: {depth: 3, img_size: [32, 16]}\n")
    cfg = load_config(Trainer, [a], ["data_size=8"])
    assert cfg.seen == ("data_size", "model.depth", "model.img_size")
    assert load_config(Trainer).seen == ()
