"""`sapiens pretrain` and `sapiens export-backbone` (entry points in pyproject.toml).

Heavy imports (torch models, deepspeed, webdataset) happen in the handlers, so that building the
parser stays fast.
"""

from __future__ import annotations

from sapiens_lite.cli import add_config_arguments


def add_pretrain_command(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="MAE pretraining with DeepSpeed",
        description=(
            "MAE pretraining of a ViT from webdataset shards. Config: dataclass defaults < --config "
            "files < section.key=value overrides. Runs as one process, under torchrun, or under the "
            "deepspeed launcher; resumes from run_dir's latest checkpoint."
        ),
    )
    add_config_arguments(p)
    p.add_argument("--no-resume", action="store_true", help="start fresh even if run_dir has a checkpoint")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate config and data; print the resolved config, DeepSpeed config, AdamW groups and data plan",
    )
    p.set_defaults(func=_run_pretrain)


def _run_pretrain(args) -> int:
    from pretrain.config import PretrainConfig
    from pretrain.train import main
    from sapiens_lite.config import load_config

    main(
        load_config(PretrainConfig, args.config, args.overrides),
        resume=not args.no_resume,
        dry_run=args.dry_run,
    )
    return 0


def add_export_backbone_command(subparsers) -> None:
    p = subparsers.add_parser(
        "export-backbone",
        help="consolidate a pretraining run's (ZeRO) checkpoint into a backbone folder",
        description=(
            "Consolidate RUN_DIR's DeepSpeed checkpoint (any ZeRO stage) to fp32 and write the MAE encoder "
            "as a backbone folder (config.json + model.safetensors + README.md) for from_pretrained / the Hub."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00010000 (default: latest)")
    p.add_argument(
        "--drop-cls-token", action="store_true", help="export without the cls token (pose backbones)"
    )
    p.add_argument(
        "--pos-embed",
        choices=("learned", "sincos"),
        default="learned",
        help="store the position table as learned (fine-tunable, default) or fixed sin-cos",
    )
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from pretrain.export import export_backbone

    model = export_backbone(
        args.run_dir, args.out, tag=args.tag, drop_cls_token=args.drop_cls_token, pos_embed=args.pos_embed
    )
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {model.config.arch} backbone, {n / 1e6:.1f} M parameters, fp32")
    return 0
