"""The `sapiens` command.

Each command is a function `add_<name>_command(subparsers)` that adds its parser and sets
`func=<handler>` (a handler takes the parsed args and returns an exit code or None).

The commands of this package are listed in `BUILTIN_COMMANDS`. The training packages (`pretrain`,
`finetune`) add theirs through the explicit `[project.entry-points."sapiens.commands"]` table in
pyproject.toml, so this module never imports them (sapiens_lite stays installable on its own).
Modules are imported only when their command is about to be added, which keeps `sapiens --help` fast.

User mistakes raise `UserError`: one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from sapiens_lite.errors import UserError

# command name -> "module:function" adding it. Order = order in `sapiens --help`.
BUILTIN_COMMANDS: dict[str, str] = {
    "info": "sapiens_lite.commands:add_info_command",
    "convert": "sapiens_lite.commands:add_convert_command",
    "predict": "sapiens_lite.commands:add_predict_command",
    "export": "sapiens_lite.commands:add_export_command",
}
ENTRY_POINT_GROUP = "sapiens.commands"


def add_config_arguments(
    parser: argparse.ArgumentParser,
    *,
    config_help: str = "config file(s), applied in order",
    example: str = "engine.total_steps=100",
) -> None:
    """`--config YAML` (repeatable) and trailing `section.key=value` overrides, for `sapiens_lite.config.load_config`."""
    parser.add_argument("--config", action="append", default=[], metavar="YAML", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help=f"e.g. {example}")


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _plugin_commands() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `sapiens` parser. Only `command`'s module is imported; the others are listed by name."""
    parser = argparse.ArgumentParser(
        prog="sapiens",
        description="sapiens: pretrain, fine-tune, convert and run human-centric ViT models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target in {**BUILTIN_COMMANDS, **_plugin_commands()}.items():
        if name != command:
            sub.add_parser(name, help=_HELP.get(name, ""))
            continue
        try:
            add = _load(target)
        except ImportError as e:
            # A training command whose extras are not installed: say how to get them.
            p = sub.add_parser(name, help=_HELP.get(name, ""))
            p.set_defaults(func=_missing_extra(name, e))
            continue
        add(sub)
    return parser


# Modules of the `train` extra: a command that needs one and lacks it is a setup mistake, not a bug.
TRAIN_EXTRAS = {"deepspeed", "webdataset", "pycocotools", "tensorboard", "matplotlib"}


def _missing_extra_message(name: str, err: ImportError) -> str:
    return (
        f"`sapiens {name}` needs the module {err.name or err}, which is not installed; "
        "install the training extras: pip install 'sapiens-toolkit[train]'"
    )


def _missing_extra(name: str, err: ImportError):
    def run(args):
        raise UserError(_missing_extra_message(name, err))

    return run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher passes --local_rank=N before the command; LOCAL_RANK is in the environment too.
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        rc = args.func(args)
    except UserError as e:
        print(f"sapiens {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name not in TRAIN_EXTRAS:
            raise
        print(f"sapiens {args.command}: error: {_missing_extra_message(args.command, e)}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno is None and e.filename is None:
            raise
        # The file system said no (a full disk, a read-only mount, a path that names a file as a folder):
        # the user's to fix, so one line naming the path rather than a traceback.
        where = f"{e.filename}: " if e.filename else ""
        print(f"sapiens {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sapiens {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split("\n"))


# One-line descriptions for `sapiens --help` (which imports no command module).
_HELP: dict[str, str] = {
    "demo": "the whole chain on drawn people: synth, pack, pretrain, fine-tune, eval, distil, export, predict",
    "info": "versions, device, and the model archs with parameter counts and GFLOPs",
    "convert": "convert a foreign checkpoint (Sapiens .pth, MAE, timm, transformers) to our safetensors format",
    "predict": "keypoints of the people in an image, a folder, a glob or a video (JSON + overlays)",
    "export": "export a pose model to a torch.export program (.pt2) or an ONNX file",
    "data": "synthesize, pack, and inspect datasets (webdataset shards)",
    "pretrain": "MAE pretraining with DeepSpeed",
    "export-backbone": "consolidate a pretraining run's (ZeRO) checkpoint into a backbone folder",
    "finetune": "top-down heatmap pose fine-tuning with DeepSpeed",
    "eval": "OKS AP / PCK evaluation of a pose model",
    "distill": "distil a pose teacher into a smaller student (DWPose's two stages)",
    "distill-cache": "run a distillation teacher once over the training shards and store its outputs",
    "distill-backbone": "distil a teacher backbone into a smaller ViT on unlabeled images",
}


if __name__ == "__main__":
    sys.exit(main())
