"""Packing images into webdataset tar shards (`sapiens data pack`) and looking at them (`inspect`).

Sources (each gives a sorted list of `PackItem`s):
    collect_folder(root)                 every image under root (recursive), sorted by relative path
    collect_coco(json_path, image_root)  one sample per COCO image, with its people's annotations
    synthesize_source(out_dir, n, ...)   the synthesizer writes images + COCO JSON, packed as above

A sample is `KEY.jpg` + `KEY.json`. The JSON holds {"file_name", "width", "height"} and, for COCO
and synthesized sources, {"image_id", "annotations": [...]}: one dict per person with
"keypoints" as a flat [x, y, v] * K list in our scheme order (17, 133 or 308), "bbox" [x, y, w, h],
"area", "iscrowd", "category_id", "id". Coordinates are in the pixels of the stored JPEG
(scaled when --resize-long shrinks the image). Keys are `{index:08d}_{sanitised name}`: the
index in the sorted input list keeps them unique and in order, and they contain no dot
(webdataset splits a member name at the first dot of its basename).

Shards are planned before anything is written: `plan_shards` cuts the sorted list into
consecutive runs of at most --max-samples samples and, with --max-bytes, at most that many
planned bytes. Planned bytes are exact when JPEGs are copied as they are (file + JSON + tar
headers) and an estimate when images are re-encoded (source bytes x the pixel ratio of the
resize; --quality is not modelled), so re-encoded shards can differ from the bound by the
estimate's error; index.json records the real sizes. Because the plan depends only on the
inputs and options, a resumed run writes the very same shards: each shard is written to
`NAME.tar.<pid>.tmp` and renamed when complete, finished shards are never rewritten, and
`pack-plan.json` (written first) makes a resume with different inputs or options an error
instead of a mix. Tars are byte-for-byte reproducible (fixed mtime, owner and mode).
`index.json` (written last) lists shards with sample counts and bytes, totals and the source;
the stream loader reads it for exact per-rank batch counts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from sapiens_lite.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
INDEX_NAME = "index.json"
PLAN_NAME = "pack-plan.json"
SHARD_PATTERN = "shard-{:06d}.tar"
TAR_MTIME = 0  # fixed member times make shards byte-for-byte reproducible
TAR_END_BYTES = 1024 + 10240  # end-of-archive blocks + the worst padding to tarfile's 10240-byte records
DEFAULT_REENCODE_QUALITY = 95


@dataclass(frozen=True)
class PackItem:
    key: str
    path: str  # the source image file
    meta: dict  # the sample's JSON, without width/height (filled in when the image is read)
    size: int  # bytes of the source file


@dataclass
class PackOptions:
    max_samples: int = 1000
    """At most this many samples per shard."""
    max_bytes: int | None = None
    """At most this many planned bytes per shard (see the module docstring); None: no bound."""
    resize_long: int | None = None
    """Shrink images whose long side is larger to this many pixels; None: keep the size."""
    quality: int | None = None
    """Re-encode every image as JPEG at this quality; None: copy JPEGs as they are (others at 95)."""
    workers: int = 1
    """Processes writing shards; 1 writes in this process."""

    def __post_init__(self):
        if self.max_samples < 1:
            raise UserError(f"--max-samples must be >= 1, got {self.max_samples}")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise UserError(f"--max-bytes must be >= 1, got {self.max_bytes}")
        if self.resize_long is not None and self.resize_long < 1:
            raise UserError(f"--resize-long must be >= 1, got {self.resize_long}")
        if self.quality is not None and not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be in 1..100, got {self.quality}")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")

    @property
    def reencode(self) -> bool:
        return self.resize_long is not None or self.quality is not None


@dataclass
class ShardInfo:
    url: str
    num_samples: int
    num_bytes: int
    num_annotations: int = 0
    first_key: str = ""
    last_key: str = ""


@dataclass
class ShardTask:
    index: int
    items: list[PackItem]
    out_dir: str
    options: PackOptions = field(default_factory=PackOptions)

    @property
    def name(self) -> str:
        return SHARD_PATTERN.format(self.index)


# ----------------------------------------------------------------------------- sources


def _safe_name(rel: str, limit: int = 60) -> str:
    stem = os.path.splitext(rel)[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[-limit:] or "img"


def collect_folder(root: str | os.PathLike) -> tuple[list[PackItem], dict]:
    """Every image under `root` (recursive, sorted by relative path)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise UserError(f"{root} is not a folder")
    rels = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    )
    if not rels:
        raise UserError(f"image folder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    items = []
    for i, rel in enumerate(rels):
        path = root / rel
        items.append(
            PackItem(f"{i:08d}_{_safe_name(rel)}", str(path), {"file_name": rel}, path.stat().st_size)
        )
    return items, {"type": "folder", "path": str(root.resolve()), "num_inputs": len(items)}


def collect_coco(json_path: str | os.PathLike, image_root: str | os.PathLike | None = None):
    """One item per image of a COCO keypoint file (17 / WholeBody 133 / 308), via sapiens_train.coco."""
    from sapiens_train.coco import load_coco_keypoints

    json_path = Path(json_path)
    if not json_path.is_file():
        raise UserError(f"COCO annotation file {json_path} does not exist")
    if image_root is not None and not Path(image_root).is_dir():
        raise UserError(f"image folder {image_root} does not exist")
    data = load_coco_keypoints(json_path, image_root=image_root)
    if data.missing_images:
        more = f" (and {len(data.missing_images) - 1} more)" if len(data.missing_images) > 1 else ""
        raise UserError(f"image {data.missing_images[0]} listed in {json_path} does not exist{more}")
    if not data.images:
        raise UserError(f"{json_path} lists no images")
    print(data.summary(), file=sys.stderr)
    images = sorted(data.images, key=lambda r: (r.file_name, r.image_id))
    items = []
    for i, img in enumerate(images):
        meta = {
            "image_id": int(img.image_id),
            "file_name": img.file_name,
            "annotations": [_person_annotation(p) for p in img.people],
        }
        path = Path(img.path)
        items.append(PackItem(f"{i:08d}_{_safe_name(img.file_name)}", str(path), meta, path.stat().st_size))
    source = {
        "type": "coco",
        "path": str(json_path.resolve()),
        "image_root": str(Path(data.image_root).resolve()),
        "keypoint_scheme": data.scheme.name,
        "num_inputs": len(items),
        "skipped_annotations": {k: v for k, v in data.skipped.items() if v},
    }
    return items, source


def _person_annotation(person) -> dict:
    """A `PersonRecord` as a COCO-style dict: flat [x, y, v] * K keypoints in the scheme's order."""
    ann = {
        "id": int(person.annotation_id),
        "category_id": int(person.category_id),
        "bbox": [float(v) for v in person.bbox],
        "area": float(person.area),
        "iscrowd": 0,  # crowd annotations are always skipped by the reader
        "num_keypoints": person.num_keypoints,
        "keypoints": [float(v) for v in person.keypoints.reshape(-1)],
    }
    for k, v in person.extra.items():  # WholeBody part boxes / valid flags
        ann[k] = v.tolist() if hasattr(v, "tolist") else v
    return ann


def synthesize_source(
    out_dir: Path,
    num_images: int,
    *,
    seed: int,
    size,
    scheme: str,
    people,
    workers: int,
    progress: bool = True,
):
    """Synthesize into out_dir/.synth (reused by a resumed run) and collect it as a COCO source."""
    from sapiens_train.synth import synthesize

    synth_dir = Path(out_dir) / ".synth"
    ann = synth_dir / "annotations.json"
    stamp = synth_dir / "request.json"
    request = {"num_images": num_images, "seed": seed, "size": size, "scheme": scheme, "people": people}
    if not (ann.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == request):
        if synth_dir.exists():
            shutil.rmtree(synth_dir)
        synthesize(
            synth_dir,
            num_images,
            seed=seed,
            size=size,
            scheme=scheme,
            people=people,
            workers=workers,
            progress=progress,
        )
        _atomic_write_text(stamp, json.dumps(request))
    items, source = collect_coco(ann, synth_dir / "images")
    return items, {"type": "synth", **request, "keypoint_scheme": source["keypoint_scheme"]}


# ----------------------------------------------------------------------------- planning


def planned_bytes(item: PackItem, options: PackOptions) -> int:
    """The bytes a sample will take in its shard (exact for copied JPEGs, else an estimate)."""
    meta = len(json.dumps(item.meta, sort_keys=True, separators=(",", ":"))) + 32  # + width/height
    image = item.size
    if options.resize_long is not None and options.max_bytes is not None:
        with Image.open(item.path) as img:
            long_side = max(img.size)
        if long_side > options.resize_long:
            image = int(image * (options.resize_long / long_side) ** 2)
    # Each member is a 512-byte header + its data padded to 512 bytes.
    return 2 * 512 + _pad512(image) + _pad512(meta)


def _pad512(n: int) -> int:
    return -(-n // 512) * 512


def plan_shards(items: list[PackItem], options: PackOptions) -> list[tuple[int, int]]:
    """Consecutive [start, end) runs of `items`, one per shard."""
    runs, start, size = [], 0, 0
    for i, item in enumerate(items):
        b = planned_bytes(item, options) if options.max_bytes is not None else 0
        full = i - start >= options.max_samples or (
            options.max_bytes is not None and size + b + TAR_END_BYTES > options.max_bytes
        )
        if full and i > start:
            runs.append((start, i))
            start, size = i, 0
        size += b
    runs.append((start, len(items)))
    return runs


# ----------------------------------------------------------------------------- writing


def encode_sample(item: PackItem, options: PackOptions) -> tuple[bytes, dict]:
    """The JPEG bytes and JSON dict of one sample."""
    meta = dict(item.meta)
    with open(item.path, "rb") as f:
        data = f.read()
    try:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        fmt = img.format
    except Exception as e:
        raise UserError(f"cannot read image {item.path}: {e}") from None
    scale = 1.0
    if options.resize_long is not None and max(width, height) > options.resize_long:
        scale = options.resize_long / max(width, height)
    if fmt == "JPEG" and scale == 1.0 and options.quality is None:
        meta.update(width=width, height=height)
        return data, meta
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 1.0 and fmt == "JPEG":
        img.draft("RGB", new_size)  # decode at 1/2^n when the target is that much smaller
    img = img.convert("RGB")
    if img.size != new_size:
        img = img.resize(new_size, Image.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=options.quality or DEFAULT_REENCODE_QUALITY)
    if scale != 1.0 and "annotations" in meta:
        sx, sy = new_size[0] / width, new_size[1] / height
        meta["annotations"] = [_scale_annotation(a, sx, sy) for a in meta["annotations"]]
    meta.update(width=new_size[0], height=new_size[1])
    return out.getvalue(), meta


def _scale_annotation(ann: dict, sx: float, sy: float) -> dict:
    ann = dict(ann)
    if "keypoints" in ann:
        k = list(ann["keypoints"])
        for j in range(0, len(k), 3):
            k[j], k[j + 1] = k[j] * sx, k[j + 1] * sy
        ann["keypoints"] = k
    if "bbox" in ann and len(ann["bbox"]) == 4:
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    if "area" in ann:
        ann["area"] = ann["area"] * sx * sy
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        ann["segmentation"] = [[v * (sx if j % 2 == 0 else sy) for j, v in enumerate(poly)] for poly in seg]
    elif seg is not None:
        ann.pop("segmentation")  # RLE masks are not resampled here
    return ann


def write_shard(task: ShardTask) -> ShardInfo:
    """Write one shard through a temporary file; a crash leaves only `*.tmp`, never a short `.tar`."""
    final = os.path.join(task.out_dir, task.name)
    tmp = f"{final}.{os.getpid()}.tmp"
    annotations = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME, user="sapiens", group="sapiens")
        try:
            for item in task.items:
                jpg, meta = encode_sample(item, task.options)
                annotations += len(meta.get("annotations", []))
                payload = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
                writer.write({"__key__": item.key, "jpg": jpg, "json": payload})
        except BaseException:
            writer.close()
            f.close()
            os.unlink(tmp)  # a kill -9 can still leave a *.tmp; the next run deletes it
            raise
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return ShardInfo(
        task.name,
        len(task.items),
        os.path.getsize(final),
        annotations,
        task.items[0].key,
        task.items[-1].key,
    )


def read_samples(url: str) -> Iterable[dict]:
    """The samples of one shard in order: {"__key__", "__url__", one bytes value per member extension}."""
    yield from wds.tarfile_samples([{"url": url}])


def write_samples(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write samples ({"__key__", extension: bytes, ...}) as one shard, atomically and reproducibly
    (the tar format and fixed headers of `write_shard`); returns the number written."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    n = 0
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME, user="sapiens", group="sapiens")
        try:
            for sample in samples:
                writer.write(sample)
                n += 1
        except BaseException:
            writer.close()
            f.close()
            os.unlink(tmp)
            raise
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n


def _existing_shard_info(task: ShardTask) -> ShardInfo:
    path = os.path.join(task.out_dir, task.name)
    annotations = 0
    for sample in wds.tarfile_samples([{"url": path}]):
        annotations += len(json.loads(sample.get("json", b"{}")).get("annotations", []))
    return ShardInfo(
        task.name, len(task.items), os.path.getsize(path), annotations, task.items[0].key, task.items[-1].key
    )


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plan_record(items, runs, source, options) -> dict:
    shards = []
    for i, (a, b) in enumerate(runs):
        h = hashlib.sha256()
        for it in items[a:b]:
            h.update(f"{it.key}\0{it.path}\0{it.size}\0".encode())
            h.update(json.dumps(it.meta, sort_keys=True).encode())
        shards.append({"url": SHARD_PATTERN.format(i), "num_samples": b - a, "sha256": h.hexdigest()})
    opts = {k: v for k, v in asdict(options).items() if k != "workers"}
    return {"format": "sapiens-pack-plan/1", "source": source, "options": opts, "shards": shards}


def pack(
    items: list[PackItem],
    source: dict,
    out_dir: str | os.PathLike,
    options: PackOptions,
    *,
    progress: bool = True,
    on_shard: Callable[[ShardInfo], None] | None = None,
) -> dict:
    """Write (or finish writing) the shards of `items` into `out_dir`; returns the index dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = plan_shards(items, options)
    plan = _plan_record(items, runs, source, options)
    plan_path = out / PLAN_NAME
    if plan_path.is_file():
        old = json.loads(plan_path.read_text())
        if old != plan:
            raise UserError(
                f"{out} holds shards of a different pack (inputs or options differ from {plan_path}); "
                "use a new output folder or delete that one"
            )
    else:
        stray = sorted(p.name for p in out.glob("*.tar"))
        if stray:
            raise UserError(
                f"{out} already holds shards ({stray[0]}, ...) not written by `sapiens data pack`"
            )
        _atomic_write_text(plan_path, json.dumps(plan, indent=1))
    for stale in out.glob("shard-*.tar.*.tmp"):  # left by an interrupted run
        stale.unlink(missing_ok=True)

    tasks = [ShardTask(i, items[a:b], str(out), options) for i, (a, b) in enumerate(runs)]
    done = {t.index: _existing_shard_info(t) for t in tasks if (out / t.name).is_file()}
    todo = [t for t in tasks if t.index not in done]
    bar = tqdm(
        total=len(items),
        initial=sum(i.num_samples for i in done.values()),
        unit="img",
        desc=f"pack {out.name}",
        disable=not progress,
        file=sys.stderr,
    )
    for info in _run_tasks(todo, options.workers):
        done[int(info.url[len("shard-") : -len(".tar")])] = info
        bar.update(info.num_samples)
        if on_shard is not None:
            on_shard(info)
    bar.close()

    infos = [done[t.index] for t in tasks]
    index = {
        "format": "sapiens-shards/1",
        "source": source,
        "options": plan["options"],
        "num_samples": sum(i.num_samples for i in infos),
        "num_bytes": sum(i.num_bytes for i in infos),
        "num_annotations": sum(i.num_annotations for i in infos),
        "shards": [asdict(i) for i in infos],
    }
    _atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=1))
    return index


def _run_tasks(tasks: list[ShardTask], workers: int) -> Iterable[ShardInfo]:
    if workers == 1 or len(tasks) <= 1:
        for t in tasks:
            yield write_shard(t)
        return
    # spawn: a clean interpreter per worker, safe whatever threads the parent runs.
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(write_shard, t) for t in tasks]
        for fut in as_completed(futures):
            yield fut.result()


# ----------------------------------------------------------------------------- inspecting


@dataclass
class ShardReport:
    url: str
    num_samples: int = 0
    num_people: int = 0
    num_keypoints: int = 0  # labelled keypoints (v > 0)
    keypoint_counts: dict = field(default_factory=dict)  # K -> number of people with K keypoints
    skipped: dict = field(default_factory=dict)  # reason -> samples the loaders would skip for it


def _people(sample: dict) -> list[dict]:
    """The sample's annotations (people); ValueError when its JSON is not what the loaders read."""
    if "json" not in sample:
        return []
    meta = json.loads(sample["json"])  # ValueError (UnicodeDecodeError is one) on bad bytes
    if not isinstance(meta, dict):
        raise ValueError("the JSON is not an object")
    people = meta.get("annotations", [])
    if not isinstance(people, list) or not all(isinstance(p, dict) for p in people):
        raise ValueError("'annotations' is not a list of objects")
    for person in people:
        k = person.get("keypoints", [])
        if not isinstance(k, list) or not all(isinstance(v, (int, float)) for v in k):
            raise ValueError("'keypoints' is not a list of numbers")
    return people


def _image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header; ValueError when it is not an image or a decompression bomb
    (more than PIL's `Image.MAX_IMAGE_PIXELS`, the limit the MAE and pose loaders apply too)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError:  # PIL's own refusal, above twice its limit
        raise ValueError("image over the pixel limit") from None
    except Exception as e:  # PIL raises many kinds for bad bytes
        raise ValueError(f"undecodable image ({type(e).__name__})") from None
    if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
        raise ValueError("image over the pixel limit")
    return w, h


def inspect_shards(
    spec: str, *, sheet: str | None = None, num_images: int = 16, cols: int = 4, tile_size: int = 256
) -> list[ShardReport]:
    """Count samples and keypoint annotations per shard; optionally write a contact sheet.

    Samples the loaders would skip (JSON they cannot read, an image that does not decode or exceeds the
    pixel limit) are counted in `skipped` by reason instead of stopping the report."""
    from sapiens_train.stream import resolve_shards

    shards = resolve_shards(spec)
    reports, thumbs = [], []
    for shard in shards:
        rep = ShardReport(shard.url)
        for sample in wds.tarfile_samples([{"url": shard.url}], handler=wds.warn_and_continue):
            rep.num_samples += 1
            try:
                people = _people(sample)
                if "jpg" in sample:
                    _image_size(sample["jpg"])
                    if sheet is not None and len(thumbs) < num_images:
                        thumbs.append(_draw_sample(sample["jpg"], people))
            except ValueError as e:
                reason = "bad JSON" if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)) else str(e)
                rep.skipped[reason] = rep.skipped.get(reason, 0) + 1
                continue
            for person in people:
                k = person.get("keypoints", [])
                rep.num_people += 1
                rep.num_keypoints += sum(1 for v in k[2::3] if v > 0)
                rep.keypoint_counts[len(k) // 3] = rep.keypoint_counts.get(len(k) // 3, 0) + 1
        reports.append(rep)
    if sheet is not None:
        _write_sheet(thumbs, sheet, cols, tile_size)
    return reports


def _draw_sample(jpg: bytes, people: list[dict]):
    import numpy as np

    from sapiens_lite.keypoints import scheme_for_num_keypoints
    from sapiens_lite.visualize import draw_keypoints

    try:
        image = np.array(Image.open(io.BytesIO(jpg)).convert("RGB"))
    except Exception as e:  # a header that parses over data that does not
        raise ValueError(f"undecodable image ({type(e).__name__})") from None
    for person in people:
        k = person.get("keypoints", [])
        if len(k) < 3 or len(k) % 3:
            continue
        try:
            scheme = scheme_for_num_keypoints(len(k) // 3)
        except UserError:
            continue  # a count of no known scheme: counted, not drawn
        image = draw_keypoints(image, np.asarray(k, dtype=np.float32).reshape(-1, 3), scheme)
    return image


def _write_sheet(images: list, path: str, cols: int, tile_size: int) -> None:
    import numpy as np

    from sapiens_lite.paths import make_dir
    from sapiens_lite.visualize import contact_sheet

    if not images:
        raise UserError("no images to draw: the shards hold no readable .jpg members")
    sheet = contact_sheet(images, cols=cols, tile_size=tile_size)
    img = sheet if isinstance(sheet, Image.Image) else Image.fromarray(np.asarray(sheet, dtype=np.uint8))
    path = Path(path)
    make_dir(path.parent, "--out")
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"--out: cannot write {path} ({e.strerror or e})") from None


def format_report(reports: list[ShardReport]) -> str:
    width = max(len(os.path.basename(r.url)) for r in reports)
    lines = [f"{'shard':<{width}}  {'samples':>8}  {'people':>8}  {'keypoints':>10}"]
    for r in reports:
        lines.append(
            f"{os.path.basename(r.url):<{width}}  {r.num_samples:>8}  {r.num_people:>8}  {r.num_keypoints:>10}"
        )
    total = ShardReport("total")
    for r in reports:
        total.num_samples += r.num_samples
        total.num_people += r.num_people
        total.num_keypoints += r.num_keypoints
        for k, n in r.keypoint_counts.items():
            total.keypoint_counts[k] = total.keypoint_counts.get(k, 0) + n
    lines.append(
        f"{'total':<{width}}  {total.num_samples:>8}  {total.num_people:>8}  {total.num_keypoints:>10}"
    )
    lines.append(f"{len(reports)} shards, {total.num_samples} samples")
    if total.keypoint_counts:
        kinds = ", ".join(f"{n} with {k} keypoints" for k, n in sorted(total.keypoint_counts.items()))
        lines.append(
            f"keypoint annotations: {total.num_people} people ({kinds}), {total.num_keypoints} labelled keypoints"
        )
    else:
        lines.append("keypoint annotations: none")
    skipped: dict[str, int] = {}
    for r in reports:
        for reason, n in r.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    if skipped:
        where = ", ".join(os.path.basename(r.url) for r in reports if r.skipped)
        what = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        lines.append(f"samples the loaders skip: {what} (in {where})")
    return "\n".join(lines)
