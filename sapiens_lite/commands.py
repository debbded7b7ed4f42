"""The `sapiens info`, `convert`, `predict` and `export` commands."""

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


# ---- sapiens predict ---------------------------------------------------------------------------------


def add_predict_command(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="keypoints of the people in an image, a folder, a glob or a video",
        description=(
            "Top-down pose prediction. SOURCE is an image, a video (.mp4, .avi, .mov, ...), a folder (searched "
            "recursively) or a quoted glob ('photos/*.jpg'). Under --out, per image: <name>.json (COCO keypoint "
            "results: image_id, category_id 1, keypoints as x, y, score triples in image pixels, score, bbox) "
            "and an overlay image <name>.jpg/.png; per video: <name>.json (the results of every frame, image_id "
            "= the 0-based frame index) and an overlay video <name>.mp4. Person boxes come from --boxes (a COCO "
            "detections JSON), from --detector (an ONNX person detector), or else the whole image is one person. "
            "Unreadable inputs are named and skipped."
        ),
    )
    p.add_argument("source", help="image, video, folder or glob pattern")
    p.add_argument(
        "--model", required=True, help="model folder, run dir, Hub repo id, checkpoint, .pt2 or .onnx"
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    boxes = p.add_mutually_exclusive_group()
    boxes.add_argument(
        "--boxes",
        default=None,
        metavar="JSON",
        help="COCO detections JSON (see sapiens_lite.boxes.CocoDetections)",
    )
    boxes.add_argument(
        "--detector",
        default=None,
        metavar="ONNX",
        help="ONNX person detector, YOLOv8/11-style [1, 4+C, N] or end-to-end [1, N, 6] output (onnx extra)",
    )
    p.add_argument(
        "--det-score-thr", type=float, default=0.3, help="detector / --boxes score threshold (0.3)"
    )
    p.add_argument("--det-nms-thr", type=float, default=0.45, help="detector NMS IoU threshold (0.45)")
    p.add_argument("--batch-size", type=int, default=16, help="persons per model call (default 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the model (slower start, faster batches)"
    )
    p.add_argument(
        "--flip", action="store_true", help="flip test: average with the mirror image (2x model work)"
    )
    p.add_argument(
        "--kpt-thr", type=float, default=0.3, help="keypoints scoring below this are not drawn (0.3)"
    )
    p.add_argument("--no-overlay", action="store_true", help="write the JSON results only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_predict)


def _write_json(path, data) -> None:
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _write_image(path, rgb) -> None:
    import os

    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)  # cv2 picks the format from the suffix
    if not cv2.imwrite(str(tmp), rgb[:, :, ::-1]):
        raise OSError(f"{path}: cv2.imwrite failed")
    os.replace(tmp, path)


def run_predict(args) -> int:
    import sys
    import time
    from pathlib import Path

    from tqdm import tqdm

    from sapiens_lite.boxes import CocoDetections, OnnxPersonDetector
    from sapiens_lite.errors import UserError
    from sapiens_lite.estimator import PoseEstimator, read_image
    from sapiens_lite.sources import list_sources
    from sapiens_lite.video import VideoReader, VideoWriter
    from sapiens_lite.visualize import draw_people

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = Path(args.out)
    sources = list_sources(args.source, exclude=out)
    dets = CocoDetections(args.boxes, score_thr=args.det_score_thr) if args.boxes else None
    detector = (
        OnnxPersonDetector(args.detector, score_thr=args.det_score_thr, nms_thr=args.det_nms_thr)
        if args.detector
        else None
    )
    estimator = PoseEstimator.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        flip_test=args.flip,
        batch_size=args.batch_size,
        detector=detector,
    )
    scheme = estimator.scheme
    progress = not args.no_progress
    skipped: list[str] = []
    t0 = time.perf_counter()  # throughput: reading, prediction, drawing and writing; not the model load

    def skip(name: str, reason: str) -> None:
        skipped.append(name)
        tqdm.write(f"sapiens predict: skipped {name}: {reason}", file=sys.stderr)

    # ---- images: read (skipping what cannot be read), predict in shared batches, write as they complete
    images = [s for s in sources if s.kind == "image"]
    n_images = n_videos = n_frames = n_people = 0

    def image_items():
        for index, s in enumerate(images):
            try:
                img = read_image(s.path)
            except UserError as e:
                skip(str(s.path), str(e).split(": ", 1)[-1])
                continue
            image_id = None
            boxes = None
            if dets is not None:
                image_id = dets.image_id(s.name)
                boxes = dets.boxes_for(s.name)
            if image_id is None:
                image_id = s.image_id_from_name if s.image_id_from_name is not None else index
            yield (s, image_id), img, boxes

    bar = tqdm(total=len(images), desc="images", unit="img", disable=not progress or not images)
    for (s, image_id), img, people in estimator.stream(image_items()):
        results = [p.to_coco(image_id) for p in people]
        _write_json(out / f"{s.out_stem}.json", results)
        if not args.no_overlay:
            suffix = (
                Path(s.name).suffix.lower()
                if Path(s.name).suffix.lower() in (".jpg", ".jpeg", ".png")
                else ".jpg"
            )
            _write_image(
                out / f"{s.out_stem}{suffix}", draw_people(img, people, scheme, kpt_thr=args.kpt_thr)
            )
        n_images += 1
        n_people += len(people)
        bar.update(1)
    bar.update(len(images) - bar.n)  # the skipped ones
    bar.close()

    # ---- videos: frames streamed through the same batching, an overlay video written alongside
    for s in (s for s in sources if s.kind == "video"):
        try:
            video = VideoReader(s.path)
        except UserError as e:
            skip(str(s.path), str(e).split(": ", 1)[-1])
            continue
        results = []
        writer = None if args.no_overlay else VideoWriter(out / f"{s.out_stem}.mp4", fps=video.fps)
        with video, tqdm(total=len(video) or None, desc=s.name, unit="frame", disable=not progress) as bar:
            frames = (
                (i, frame, dets.boxes_for(frame=i) if dets is not None else None)
                for i, frame in enumerate(video)
            )
            try:
                for i, frame, people in estimator.stream(frames):
                    results.extend(p.to_coco(i) for p in people)
                    if writer is not None:
                        writer.write(draw_people(frame, people, scheme, kpt_thr=args.kpt_thr))
                    n_frames += 1
                    n_people += len(people)
                    bar.update(1)
            except BaseException:
                if writer is not None:
                    writer.close(ok=False)
                raise
        if writer is not None:
            writer.close()
        _write_json(out / f"{s.out_stem}.json", results)
        n_videos += 1

    if len(skipped) == len(sources):
        raise UserError(f"{args.source}: none of the {len(sources)} inputs could be read")

    def count(n: int, what: str) -> str:
        return f"{n} {what}{'' if n == 1 else 's'}"

    what = [count(n_images, "image")] if images else []
    what += [f"{count(n_videos, 'video')} ({count(n_frames, 'frame')})"] if n_videos else []
    what += ["1 person" if n_people == 1 else f"{n_people} people"]
    skips = f"; skipped {count(len(skipped), 'unreadable input')}" if skipped else ""
    seconds = time.perf_counter() - t0
    rate = f" in {seconds:.1f} s ({(n_images + n_frames) / seconds:.1f} images/s)" if seconds > 0 else ""
    print(f"sapiens predict: {', '.join(what)} -> {out}{rate}{skips}")
    return 0


# ---- sapiens export ----------------------------------------------------------------------------------


def add_export_command(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a pose model to a torch.export program (.pt2) or an ONNX file",
        description=(
            "Write MODEL's forward (normalised crops [B, 3, H, W] -> heatmaps [B, K, H/4, W/4], dynamic batch) "
            "to OUT as a torch.export program (.pt2) or an ONNX file (.onnx, needs the onnx extra), with the "
            "model's config inside. Both load back with PoseEstimator.from_pretrained(OUT) and "
            "`sapiens predict --model OUT`. After writing, the file is loaded back and its heatmaps compared "
            "with the eager model's (--no-check skips that)."
        ),
    )
    p.add_argument("model", help="model folder, run dir, Hub repo id or checkpoint")
    p.add_argument("out", help="output file (.pt2 or .onnx; the suffix is added when missing)")
    p.add_argument("--format", choices=("torch", "onnx"), default=None, help="default: from OUT's suffix")
    p.add_argument("--device", default="cpu", help="device the .pt2 program is made for (default cpu)")
    p.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help=".pt2 only; ONNX is fp32"
    )
    p.add_argument("--max-batch", type=int, default=1024, help="largest batch the program accepts (1024)")
    p.add_argument("--no-check", action="store_true", help="do not compare the export with the eager model")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from pathlib import Path

    import torch

    from sapiens_lite.errors import UserError
    from sapiens_lite.estimator import resolve_dtype
    from sapiens_lite.export import FORMATS, TOLERANCE, export_model, load_exported
    from sapiens_lite.loading import load_pose_model

    out = Path(args.out)
    fmt = args.format or next((f for f, s in FORMATS.items() if out.suffix.lower() == s), None)
    if fmt is None:
        raise UserError(f"{out}: give --format torch|onnx, or an OUT ending in .pt2 or .onnx")
    if out.suffix.lower() != FORMATS[fmt]:
        out = out.with_name(out.name + FORMATS[fmt])
    if args.max_batch < 2:
        raise UserError(f"--max-batch must be >= 2, got {args.max_batch}")
    dtype = resolve_dtype(args.dtype)
    model = load_pose_model(args.model)
    export_model(model, out, fmt=fmt, device=args.device, dtype=dtype, max_batch=args.max_batch)
    size = sum(f.stat().st_size for f in out.parent.glob(out.name + "*"))
    print(f"{args.model} -> {out} ({fmt}, {args.dtype}, batch 1..{args.max_batch}, {size / 2**20:.1f} MiB)")
    if args.no_check:
        return 0
    loaded = load_exported(out, device=args.device if fmt == "torch" else None)
    h, w = model.config.input_size
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x.to(args.device, dtype)).float().cpu()
        got = loaded(x.to(loaded.device, loaded.dtype)).float().cpu()
    err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    tol = TOLERANCE[fmt] if dtype == torch.float32 else 2e-2
    print(f"check: batch 3, max |export - eager| / max |eager| = {err:.2e} (tolerance {tol:.0e})")
    if not err <= tol:
        raise UserError(f"{out}: the export differs from the eager model by {err:.2e} (> {tol:.0e})")
    return 0
