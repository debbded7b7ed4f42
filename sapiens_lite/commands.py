"""The `sapiens info` and `sapiens convert` commands."""

from __future__ import annotations


def add_info_command(sub) -> None:
    p = sub.add_parser("info", help="versions, device, and the model archs with parameter counts and GFLOPs")
    p.add_argument(
        "--img-size",
        type=int,
        nargs=2,
        default=(1024, 768),
        metavar=("H", "W"),
        help="input size for the GFLOPs column (default: 1024 768)",
    )
    p.set_defaults(func=run_info)


# distribution names reported by `sapiens info`; the training ones are looked up, never imported
# (importing DeepSpeed alone takes seconds and may probe the CUDA toolchain).
_CORE_PACKAGES = ("sapiens-toolkit", "torch", "timm", "safetensors", "huggingface_hub", "numpy")
_TRAIN_PACKAGES = ("deepspeed", "webdataset", "pycocotools")


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def run_info(args) -> int:
    import platform

    import torch

    from sapiens_lite.errors import UserError
    from sapiens_lite.flops import count_params, forward_flops
    from sapiens_lite.models.vit import ARCHS, ViTConfig

    img_size = tuple(getattr(args, "img_size", (1024, 768)))
    if any(s <= 0 or s % 16 for s in img_size):
        raise UserError(
            f"--img-size: H and W must be positive multiples of the patch size 16, got {img_size}"
        )
    print(f"python           {platform.python_version()} ({platform.system()} {platform.machine()})")
    for name in _CORE_PACKAGES:
        print(f"{name:<16} {_dist_version(name)}")
    for name in _TRAIN_PACKAGES:
        print(f"{name:<16} {_dist_version(name)}  (training extra)")

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        print(f"{'device':<16} cuda: {n} x {', '.join(names)} (CUDA {torch.version.cuda})")
    else:
        print(f"{'device':<16} CPU ({torch.get_num_threads()} threads)")

    print()
    print(f"archs (params without cls token; forward GFLOPs of one {img_size[0]}x{img_size[1]} image)")
    print(f"{'arch':<14} {'dim':>5} {'depth':>5} {'heads':>5} {'params':>9} {'GFLOPs':>9}")
    for arch, size in ARCHS.items():
        cfg = ViTConfig(arch=arch, img_size=img_size)
        params = count_params(cfg)
        gflops = forward_flops(cfg) / 1e9
        p = f"{params / 1e9:.3f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
        print(
            f"{arch:<14} {size['embed_dim']:>5} {size['depth']:>5} {size['num_heads']:>5} {p:>9} {gflops:>9.1f}"
        )
    return 0


def add_convert_command(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a foreign checkpoint to our safetensors format",
        description=(
            "Convert a Sapiens (.pth), facebookresearch/mae, timm or transformers (ViTMAE, VitPose) checkpoint "
            "into a folder with config.json + model.safetensors: a backbone, or a pose model when the "
            "checkpoint has a pose head. SRC is a checkpoint file, a folder as transformers' save_pretrained "
            "writes it (config.json + model.safetensors, shards, or pytorch_model.bin), or a Hugging Face Hub "
            "repo id (fetched through the HF cache; HF_HUB_OFFLINE=1 uses the cache only). .pth/.bin files "
            "are read with torch.load(weights_only=True)."
        ),
    )
    p.add_argument(
        "src", help="checkpoint file (.pth/.pt/.bin/.ckpt/.safetensors), transformers folder, or Hub repo id"
    )
    p.add_argument("dst", help="output folder (created; files in it are replaced)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo (default: main)")
    p.add_argument(
        "--source",
        default=None,
        help="force the format (sapiens_pretrain, sapiens_pose, mae, timm, transformers_vitmae, "
        "transformers_vitpose) instead of recognising it from the keys",
    )
    p.add_argument("--arch", default=None, help="arch of the backbone (default: from its width and depth)")
    p.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads of a backbone whose size is in no arch table (read from config.json if any)",
    )
    p.add_argument(
        "--grid", default=None, help="GHxGW patch grid of the position embedding if neither square nor 4:3"
    )
    p.add_argument(
        "--scheme", default=None, help="keypoint scheme of a pose head (default: from its keypoint count)"
    )
    p.set_defaults(func=run_convert)


def run_convert(args) -> int:
    from sapiens_lite.convert import build_model, read_checkpoint
    from sapiens_lite.errors import UserError
    from sapiens_lite.paths import output_dir

    output_dir(args.dst, "DST")  # before the (possibly long) read of the source
    grid = None
    if args.grid is not None:
        try:
            grid = tuple(int(v) for v in args.grid.lower().split("x"))
        except ValueError:
            grid = ()
        if len(grid) != 2:
            raise UserError(f"--grid must look like 64x48, got {args.grid!r}")
    conv = read_checkpoint(
        args.src, revision=args.revision, source=args.source, grid=grid, num_heads=args.num_heads
    )
    model = build_model(conv, arch=args.arch, scheme=args.scheme)
    if conv.head is not None:
        what = f"pose model ({conv.hints.head.kind} head, {conv.hints.head.num_keypoints} keypoints)"
    else:
        what = "backbone" + (" (MAE decoder not kept)" if conv.decoder is not None else "")
    origin = {"source": conv.source, "checkpoint": str(args.src)}
    if args.revision is not None:
        origin["revision"] = args.revision
    model.save_pretrained(args.dst, metadata={"converted_from": origin})
    for note in conv.notes:
        print(f"note: {note}")
    cfg = model.config if conv.head is None else model.backbone.config  # resolved: sizes filled in
    print(
        f"{args.src} [{conv.source}] -> {args.dst}: {what}, arch {cfg.arch} ({cfg.depth} layers, "
        f"{cfg.num_heads} heads), img_size {tuple(cfg.img_size)}, cls_token {cfg.cls_token}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters"
    )
    return 0
