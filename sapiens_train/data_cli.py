"""`sapiens data synth | pack | inspect`: make, pack and look at datasets.

    sapiens data synth OUT --num-images N --seed S ...        procedural people + COCO JSON
    sapiens data pack --images DIR --out SHARDS                 image folder -> webdataset shards
    sapiens data pack --coco ann.json [--image-root DIR] --out SHARDS
    sapiens data pack --synth N --seed S --out SHARDS           synthesize, then pack
    sapiens data inspect SHARDS_OR_INDEX [--out sheet.png]      counts + a contact sheet with keypoints

Heavy modules (webdataset, the synthesizer) are imported in the handlers, so `sapiens data --help`
stays fast. See sapiens_train/shards.py for the shard format and how resuming works.
"""

from __future__ import annotations

import argparse
import json
import sys

from sapiens_lite.errors import UserError


def add_data_command(subparsers) -> None:
    p = subparsers.add_parser("data", help="synthesize, pack, and inspect datasets (webdataset shards)")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    # The synthesizer owns its arguments; they are parsed in the handler so that building this
    # parser does not import it.
    s = sub.add_parser(
        "synth",
        help="render procedural people with exact 17/133/308 keypoints into images + COCO JSON",
        add_help=False,
        prefix_chars="\0",  # pass every token (including --help) through to the synthesizer's parser
    )
    s.add_argument("synth_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=run_synth_command)

    k = sub.add_parser(
        "pack",
        help="pack images (folder, COCO JSON, or the synthesizer) into webdataset tar shards + index.json",
        description="Pack images into webdataset tar shards (KEY.jpg + KEY.json) with an index.json. "
        "Resumable: run the same command again after an interruption.",
    )
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="a folder of images (recursive: jpg, png, webp, ...)")
    src.add_argument(
        "--coco", metavar="JSON", help="a COCO keypoint annotation file (17 / WholeBody 133 / 308)"
    )
    src.add_argument("--synth", metavar="N", type=int, help="synthesize N images and pack them")
    k.add_argument("--image-root", metavar="DIR", help="with --coco: the folder holding its images")
    k.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards")
    k.add_argument(
        "--max-samples", type=int, default=1000, metavar="N", help="samples per shard (default 1000)"
    )
    k.add_argument(
        "--max-bytes",
        type=_parse_bytes,
        default=None,
        metavar="BYTES",
        help="bytes per shard, e.g. 500M or 2G",
    )
    k.add_argument("--resize-long", type=int, default=None, metavar="PX", help="shrink long sides to PX")
    k.add_argument("--quality", type=int, default=None, metavar="Q", help="re-encode as JPEG at this quality")
    k.add_argument("--workers", type=int, default=1, metavar="N", help="processes writing shards (default 1)")
    k.add_argument("--seed", type=int, default=0, help="with --synth: the synthesizer's seed")
    k.add_argument(
        "--synth-size", default="256x192", metavar="HxW", help="with --synth: image size (default 256x192)"
    )
    k.add_argument("--scheme", default="goliath308", help="with --synth: keypoint scheme")
    k.add_argument(
        "--people", default="1-4", metavar="MIN-MAX", help="with --synth: people per image (default 1-4)"
    )
    k.add_argument("--no-progress", action="store_true", help="no progress bar")
    k.set_defaults(func=run_pack_command)

    i = sub.add_parser(
        "inspect",
        help="print per-shard sample and keypoint counts; write a contact sheet with keypoints",
    )
    i.add_argument("shards", metavar="SHARDS_OR_INDEX", help="index.json, a shard folder, or a brace pattern")
    i.add_argument("--out", metavar="PNG", help="write a contact sheet of the first images here")
    i.add_argument("--num-images", type=int, default=16, help="images on the contact sheet (default 16)")
    i.add_argument("--cols", type=int, default=4, help="contact sheet columns (default 4)")
    i.add_argument("--tile-size", type=int, default=256, help="contact sheet tile size in pixels")
    i.add_argument("--json", action="store_true", help="print the counts as JSON")
    i.set_defaults(func=run_inspect_command)


def _parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 500M, 2G, 1000000)") from None


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--synth-size must be HxW (e.g. 256x192), got {text!r}") from None
    return h, w


def _parse_people(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition("-")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise UserError(f"--people must be MIN-MAX (e.g. 1-4), got {text!r}") from None
    if not 1 <= lo_i <= hi_i:
        raise UserError(f"--people must satisfy 1 <= MIN <= MAX, got {text!r}")
    return lo_i, hi_i


def run_synth_command(args) -> int | None:
    from sapiens_lite.paths import output_dir
    from sapiens_train.synth import add_synth_arguments, run_synth

    parser = argparse.ArgumentParser(prog="sapiens data synth", description="Render procedural people.")
    add_synth_arguments(parser)
    synth_args = parser.parse_args(args.synth_args)
    # Every mistake before the first image is drawn.
    if not 1 <= synth_args.quality <= 100:
        raise UserError(f"--quality must be in 1..100 (JPEG quality), got {synth_args.quality}")
    for name in ("num_images", "workers"):
        if getattr(synth_args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(synth_args, name)}")
    output_dir(synth_args.out, "OUT")
    return run_synth(synth_args)


def run_pack_command(args) -> int:
    from sapiens_lite.paths import output_dir
    from sapiens_train.shards import PackOptions, collect_coco, collect_folder, pack, synthesize_source

    output_dir(args.out, "--out")  # before the sources are read or drawn
    options = PackOptions(
        max_samples=args.max_samples,
        max_bytes=args.max_bytes,
        resize_long=args.resize_long,
        quality=args.quality,
        workers=args.workers,
    )
    if args.image_root and not args.coco:
        raise UserError("--image-root goes with --coco")
    if args.images:
        items, source = collect_folder(args.images)
    elif args.coco:
        items, source = collect_coco(args.coco, args.image_root)
    else:
        if args.synth < 1:
            raise UserError(f"--synth must be >= 1, got {args.synth}")
        items, source = synthesize_source(
            args.out,
            args.synth,
            seed=args.seed,
            size=_parse_size(args.synth_size),
            scheme=args.scheme,
            people=_parse_people(args.people),
            workers=args.workers,
            progress=not args.no_progress,
        )
    index = pack(items, source, args.out, options, progress=not args.no_progress)
    print(
        f"{args.out}: {len(index['shards'])} shards, {index['num_samples']} samples, "
        f"{index['num_bytes'] / 2**20:.1f} MiB, {index['num_annotations']} annotations"
    )
    return 0


def run_inspect_command(args) -> int:
    from sapiens_lite.paths import output_file
    from sapiens_train.shards import format_report, inspect_shards

    for name in ("num_images", "cols", "tile_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out:
        output_file(args.out, "--out")  # before the shards are read
    reports = inspect_shards(
        args.shards, sheet=args.out, num_images=args.num_images, cols=args.cols, tile_size=args.tile_size
    )
    if args.json:
        print(json.dumps([r.__dict__ for r in reports], indent=1))
    else:
        print(format_report(reports))
    if args.out:
        print(f"contact sheet: {args.out}", file=sys.stderr)
    return 0
