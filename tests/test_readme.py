"""The README's commands are what a newcomer types: its first two commands, and every `sapiens` command in
its shell blocks names a real subcommand, parses, and (for the config-driven ones) builds its config.

The training commands are checked up to their resolved config (every key exists, every value has its type,
the shipped YAML files load); the test suite runs the real chains elsewhere (the demo, the trainers).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from sapiens_lite.cli import build_parser
from sapiens_lite.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

SETUP_AND_DEMO = 'python3 -m venv .venv && .venv/bin/pip install -e ".[train,dev]" && .venv/bin/sapiens demo'
TESTS = ".venv/bin/python -m pytest"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def logical_lines(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def sapiens_invocations() -> list[list[str]]:
    """The arguments after `sapiens` of every README command that runs it (directly, or through torchrun,
    the deepspeed launcher or sbatch with `-m sapiens_lite.cli` / `--module sapiens_lite.cli`)."""
    found = []
    for block in shell_blocks(README.read_text()):
        for line in logical_lines(block):
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words and words[0] in ("sapiens", ".venv/bin/sapiens"):
                    found.append(words[1:])
                    continue
                for i, w in enumerate(words[1:], 1):
                    if w == "sapiens_lite.cli" and words[i - 1] in ("-m", "--module"):
                        found.append(words[i + 1 :])
                        break
    return found


def test_the_first_two_commands_set_up_and_run_the_demo_then_the_tests():
    blocks = shell_blocks(README.read_text())
    assert [logical_lines(b) for b in blocks[:2]] == [[SETUP_AND_DEMO], [TESTS]]
    ci = (ROOT / ".ci" / "run").read_text()
    assert TESTS + " -q" in ci or TESTS in ci.splitlines(), "the CI runs the README's test command"


def _config_class(command: str):
    from finetune.config import FinetuneConfig
    from finetune.distill_config import BackboneDistillConfig, DistillConfig
    from pretrain.config import PretrainConfig

    return {
        "pretrain": PretrainConfig,
        "finetune": FinetuneConfig,
        "distill": DistillConfig,
        "distill-cache": DistillConfig,
        "distill-backbone": BackboneDistillConfig,
    }.get(command)


INVOCATIONS = sapiens_invocations()


def test_the_readme_runs_every_training_command():
    commands = {args[0] for args in INVOCATIONS}
    assert {
        "demo",
        "pretrain",
        "finetune",
        "eval",
        "distill",
        "distill-backbone",
        "predict",
        "export",
    } <= commands


@pytest.mark.parametrize("args", INVOCATIONS, ids=[" ".join(a)[:60] for a in INVOCATIONS])
def test_readme_command_parses_and_its_config_builds(args, tmp_path, monkeypatch):
    parser = build_parser(args[0])
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"`sapiens {shlex.join(args)}` does not parse (exit {e.code})")
    cls = _config_class(args[0])
    if cls is None or not getattr(ns, "config", None):
        return
    configs = [ROOT / c for c in ns.config]
    for c in configs:
        assert c.is_file(), f"{c} named in the README does not exist"
    # Paths in overrides (data.index=/data/..., init.path=...) are the user's; the config itself must build.
    # Overrides naming files that are not here are kept out: finalize reads a checkpoint's shape from them.
    overrides = [o for o in ns.overrides if not re.match(r"init\.path=|teacher\.path=", o)]
    monkeypatch.chdir(tmp_path)
    load_config(cls, configs, overrides)
