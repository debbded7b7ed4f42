"""The `sapiens finetune`, `eval`, `distill`, `distill-cache` and `distill-backbone` commands (added through
the `sapiens.commands` entry points).

sapiens finetune --config configs/finetune/tiny_cpu_coco17.yaml engine.total_steps=100
sapiens eval --checkpoint runs/tiny/final --config configs/finetune/tiny_cpu_coco17.yaml
sapiens eval --checkpoint runs/tiny/final --ann val.json --images val/ --detections dets.json
sapiens distill --config configs/distill/tiny_cpu_coco17.yaml           (and distill-cache, distill-backbone)
"""

from __future__ import annotations

from sapiens_lite.cli import add_config_arguments


def add_finetune_command(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="top-down heatmap pose fine-tuning with DeepSpeed",
        description="Fine-tune a pose model. Settings: defaults < --config files (in order) < section.key=value.",
    )
    add_config_arguments(p)
    _add_trainer_flags(p, checks="config and data")
    p.set_defaults(func=run_finetune)


def run_finetune(args) -> int:
    from finetune.config import FinetuneConfig
    from finetune.train import main

    return _run_trainer(FinetuneConfig, main, args)


def _add_trainer_flags(p, checks: str = "config, teacher and data") -> None:
    p.add_argument("--no-resume", action="store_true", help="start fresh even if run_dir has a checkpoint")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"validate {checks}; print the resolved config, DeepSpeed config, AdamW groups and data plan",
    )


def _run_trainer(config_class, main, args) -> int:
    """Config files + overrides -> `main(cfg, resume=, dry_run=)`, the final metrics printed if any."""
    from sapiens_lite.config import load_config

    cfg = load_config(config_class, args.config, args.overrides)
    summary = main(cfg, resume=not args.no_resume, dry_run=args.dry_run)
    metrics = summary.get("metrics") or {}
    if metrics:
        print("final: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return 0


def add_eval_command(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="OKS AP / PCK evaluation of a pose model",
        description=(
            "Top-down evaluation on a COCO-format val set (COCO 17, the official COCO-WholeBody file, "
            "308 points): OKS AP/AR as MMPose / xtcocotools compute them, per part (body, foot, face, "
            "hands) where the scheme has parts, PCK@0.05 on ground-truth boxes; writes results.json, "
            "metrics.json and overlays."
        ),
    )
    p.add_argument(
        "--checkpoint", required=True, help="pose model folder, Hub repo id, or a Sapiens pose .pth"
    )
    add_config_arguments(
        p, config_help="fine-tuning config (val set, eval knobs)", example="eval.batch_size=8"
    )
    p.add_argument("--ann", help="val annotation JSON (default: data.val_ann of the config)")
    p.add_argument("--images", help="val image folder (default: data.val_images of the config)")
    p.add_argument("--detections", help="detections JSON; default: ground-truth boxes")
    p.add_argument("--no-flip", action="store_true", help="disable flip test")
    p.add_argument(
        "--out", help="folder for results.json, metrics.json and overlays/ (default: <checkpoint>/eval)"
    )
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    import torch

    from finetune.config import FinetuneConfig
    from finetune.evaluate import evaluate_model, format_metrics
    from sapiens_lite.config import load_config
    from sapiens_lite.errors import UserError
    from sapiens_lite.loading import load_pose_model
    from sapiens_lite.paths import output_dir

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    ev = cfg.eval
    if args.detections:
        ev = replace(ev, detections=args.detections)
    if args.no_flip:
        ev = replace(ev, flip_test=False)
    ann = args.ann or cfg.data.val_ann
    images = args.images or cfg.data.val_images
    if not ann:
        raise UserError("no val annotations: pass --ann or a --config with data.val_ann")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device: {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu")
    ckpt = Path(args.checkpoint)
    out = output_dir(args.out or (ckpt / "eval" if ckpt.is_dir() else "eval"), "--out")
    if Path(ann).is_dir():
        raise UserError(f"--ann: {ann} is a folder, not an annotation file")
    # With a config the checkpoint must match its keypoint scheme; without one the checkpoint decides.
    expected = cfg.model.scheme if args.config else None
    model = load_pose_model(
        args.checkpoint,
        expected_scheme=expected,
        config=cfg.model if args.config and _is_foreign_file(args.checkpoint) else None,
        revision=cfg.init.revision,
    )
    metrics = evaluate_model(
        model.to(device).eval(), ann, images, ev, device=device, out_dir=out, num_workers=cfg.data.num_workers
    )
    boxes = f"detections {ev.detections}" if ev.detections else "ground-truth boxes"
    print(
        f"{ann}: {model.scheme.num_keypoints} keypoints ({model.scheme.name}), {boxes}, "
        f"flip test {'on' if ev.flip_test else 'off'}, OKS-NMS {ev.nms_thr:g} ({ev.nms_area} area)"
    )
    print(format_metrics(metrics, tuple(model.scheme.parts)))
    print(f"results: {out / 'results.json'}  metrics: {out / 'metrics.json'}")
    print(f"overlays (best and worst OKS, ground truth | prediction): {out / 'overlays'}")
    return 0


def _is_foreign_file(path: str) -> bool:
    """A checkpoint file (e.g. a Sapiens .pth) holds no config: the --config's model describes it."""
    from sapiens_lite.loading import locate

    return locate(path)[0] == "file"


# ---- distillation ----------------------------------------------------------------------------------


def add_distill_command(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="distil a pose teacher into a smaller student (DWPose's two stages)",
        description="Pose distillation: a frozen teacher (any checkpoint load_model reads) and a student; "
        "ground-truth + heatmap + feature losses. Settings: defaults < --config files < section.key=value.",
    )
    add_config_arguments(p, example="distill.stage=2")
    _add_trainer_flags(p)
    p.set_defaults(func=run_distill)


def run_distill(args) -> int:
    from finetune.distill import main
    from finetune.distill_config import DistillConfig

    return _run_trainer(DistillConfig, main, args)


def add_distill_cache_command(sub) -> None:
    p = sub.add_parser(
        "distill-cache",
        help="run a distillation teacher once over the training shards and store its outputs",
        description="Write teacher.cache: the shards of data.train_shards with the teacher's heatmaps "
        "(and features) for data.views augmentation draws per image. Resumable.",
    )
    add_config_arguments(p, config_help="the distillation config (the same one the run uses)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_distill_cache)


def run_distill_cache(args) -> int:
    from finetune.distill import write_teacher_cache
    from finetune.distill_config import DistillConfig
    from sapiens_lite.config import load_config

    cfg = load_config(DistillConfig, args.config, args.overrides)
    write_teacher_cache(cfg, progress=not args.no_progress)
    return 0


def add_distill_backbone_command(sub) -> None:
    p = sub.add_parser(
        "distill-backbone",
        help="distil a teacher backbone into a smaller ViT on unlabeled images",
        description="Backbone distillation: the student matches the teacher's intermediate tokens on "
        "unlabeled image shards; run_dir/backbone/ starts `sapiens finetune` (init.path=run_dir).",
    )
    add_config_arguments(p)
    _add_trainer_flags(p)
    p.set_defaults(func=run_distill_backbone)


def run_distill_backbone(args) -> int:
    from finetune.distill_backbone import main
    from finetune.distill_config import BackboneDistillConfig

    return _run_trainer(BackboneDistillConfig, main, args)
