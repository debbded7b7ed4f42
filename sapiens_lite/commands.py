"""The `sapiens info` and `sapiens convert` commands."""

from __future__ import annotations


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="versions, device, and the model archs with parameter counts and GFLOPs")
    p.set_defaults(func=run_info)


def run_info(args) -> int:
    import platform

    import torch

    import sapiens_lite

    print(f"sapiens-toolkit {sapiens_lite.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    return 0


def add_convert_command(sub) -> None:
    p = sub.add_parser("convert", help="convert a foreign checkpoint to our safetensors format")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from sapiens_lite.errors import UserError

    raise UserError("not implemented yet")
