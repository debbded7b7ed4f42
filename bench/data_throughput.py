"""Data throughput per worker: our shards + stream loader + MAE transform against a folder of JPEGs + torchvision.

Both pipelines run single-process (num_workers=0, one torch thread: what one DataLoader worker gets),
over the SAME images in the same run, at 224x224 and 1024x768, batch 8:

    ours       webdataset shards (sapiens data pack) -> build_stream(...) -> MAEDecode (PIL, reduced
               JPEG decoding when the crop is >= 2x the target) -> default_collate
    reference  image folder -> PIL.Image.open().convert("RGB") -> torchvision RandomResizedCrop(scale
               0.2-1, bilinear) + RandomHorizontalFlip + ToTensor + Normalize -> DataLoader batches

It also times candidate decoders for the MAE crop on in-memory bytes (ours: PIL decode with `draft` +
OpenCV crop/resize; PIL alone; OpenCV alone with IMREAD_REDUCED_*; torchvision.io.decode_jpeg +
resized_crop), the measurement behind the choice stated in sapiens_train/transforms.py.

Images: scikit-image's sample photos (astronaut, coffee, chelsea, rocket, camera, ...) resized to 1280x960
with mild sensor-like noise, so their JPEG size (about 0.3 MB at quality 90) is that of a real
photo rather than of a smooth upscale. Made in a temp dir, deleted afterwards.

    python bench/data_throughput.py                       # about 45 s on one CPU core
    python bench/data_throughput.py --seconds 3 --out data_throughput.json

Throughput is the median of `--rounds` alternating timed passes of at least `--seconds` each.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._peak import device_name, write_json  # noqa: E402

SIZES = {"224x224": (224, 224), "1024x768": (1024, 768)}
PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "retina",
    "camera",
)


def make_images(folder: str, n: int, src_hw: tuple[int, int], seed: int = 0) -> list[str]:
    import cv2
    from PIL import Image
    from skimage import data as skdata

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        img = getattr(skdata, name)()
        img = img[0] if isinstance(img, tuple) else img  # stereo_motorcycle: (left, right, disparity)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        photos.append(np.ascontiguousarray(img[..., :3]))
    paths = []
    h, w = src_hw
    for i in range(n):
        base = photos[i % len(photos)]
        if i // len(photos) % 2:
            base = base[:, ::-1]
        img = cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img = np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(img).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def timed(fn, seconds: float) -> float:
    """Images/s of `fn()` (which returns how many images it produced), run for >= `seconds`."""
    n, t0 = 0, time.perf_counter()
    while True:
        n += fn()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return n / dt


def ours_pass(wds, index: str, size, batch: int, epoch: list[int]):
    from sapiens_train.stream import build_stream
    from sapiens_train.transforms import MAEDecode, MAETransformConfig

    loader = build_stream(
        index,
        decode=MAEDecode(MAETransformConfig(size=size)),
        batch_size=batch,
        num_workers=0,
        seed=0,
        rank=0,
        world_size=1,
        shuffle_buffer=64,
    )

    def run():
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        n = 0
        for x in loader:
            n += x.shape[0]
        return n

    return run


def reference_pass(paths: list[str], size, batch: int):
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )

    class Folder(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with open(paths[i], "rb") as f:
                return tf(Image.open(f).convert("RGB"))

    loader = torch.utils.data.DataLoader(
        Folder(), batch_size=batch, shuffle=True, num_workers=0, drop_last=True
    )

    def run():
        n = 0
        for x in loader:
            n += x.shape[0]
        return n

    return run


def decoder_candidates(size):
    """decode + random resized crop + flip + normalise of one JPEG, three ways."""
    import cv2
    import torchvision
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    cv2.setNumThreads(1)

    from sapiens_train.transforms import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        MAETransform,
        MAETransformConfig,
        random_resized_crop_params,
    )

    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ours = MAETransform(MAETransformConfig(size=size))  # PIL decode (+draft), cv2 crop/resize
    reduced = (
        (8, cv2.IMREAD_REDUCED_COLOR_8),
        (4, cv2.IMREAD_REDUCED_COLOR_4),
        (2, cv2.IMREAD_REDUCED_COLOR_2),
    )

    def opencv(data: bytes, seed: int):
        rng = np.random.default_rng(seed)
        width, height = Image.open(io.BytesIO(data)).size  # header only
        top, left, h, w = random_resized_crop_params(rng, width, height, (0.2, 1.0), (3 / 4, 4 / 3))
        factor, flag, r = min(w / size[1], h / size[0]), cv2.IMREAD_COLOR, 1
        for rr, fl in reduced:
            if factor >= rr:
                flag, r = fl, rr
                break
        a = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        a = a[top // r : (top + h) // r, left // r : (left + w) // r]
        a = cv2.resize(a, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        a = cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
        return (x / 255 - mean) / std

    def tvio(data: bytes, seed: int):
        rng = np.random.default_rng(seed)
        x = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        height, width = x.shape[1:]
        top, left, h, w = random_resized_crop_params(rng, width, height, (0.2, 1.0), (3 / 4, 4 / 3))
        x = F.resized_crop(x, top, left, h, w, list(size), antialias=True)
        if rng.random() < 0.5:
            x = x.flip(-1)
        return F.normalize(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)

    def pil_only(data: bytes, seed: int):  # our first version: PIL crops and resizes (antialiased)
        rng = np.random.default_rng(seed)
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        top, left, h, w = random_resized_crop_params(rng, width, height, (0.2, 1.0), (3 / 4, 4 / 3))
        factor = min(w / size[1], h / size[0])
        if factor >= 2:
            img.draft("RGB", (int(width / factor) + 1, int(height / factor) + 1))
        sx, sy = img.size[0] / width, img.size[1] / height
        img = img.convert("RGB").resize(
            (size[1], size[0]), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float()
        return (x / 255 - mean) / std

    return {"ours: PIL+cv2": ours, "PIL only": pil_only, "OpenCV": opencv, "torchvision.io": tvio}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-images", type=int, default=48)
    p.add_argument("--source-size", default="960x1280", metavar="HxW", help="image size (default 960x1280)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seconds", type=float, default=1.5, help="minimum seconds per timed pass")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed passes per pipeline (median)")
    p.add_argument("--no-decoders", action="store_true", help="skip the decoder comparison")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import webdataset as wds

    from sapiens_train.shards import PackOptions, collect_folder, pack

    torch.set_num_threads(1)  # what one DataLoader worker gets
    src_hw = tuple(int(v) for v in args.source_size.lower().split("x"))
    results = {
        "benchmark": "data_throughput",
        "device": device_name("cpu"),  # one thread: what a DataLoader worker gets
        "images": args.num_images,
        "source_size": list(src_hw),
        "batch": args.batch,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="data_throughput_") as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        t0 = time.perf_counter()
        paths = make_images(folder, args.num_images, src_hw)
        items, source = collect_folder(folder)
        index = pack(items, source, os.path.join(tmp, "shards"), PackOptions(max_samples=16), progress=False)
        mean_kb = index["num_bytes"] / index["num_samples"] / 1024
        print(
            f"{args.num_images} photos {src_hw[0]}x{src_hw[1]} (~{mean_kb:.0f} KiB each), "
            f"{len(index['shards'])} shards, made in {time.perf_counter() - t0:.1f}s; torch threads: 1"
        )

        for name, size in SIZES.items():
            epoch = [0]
            ours_fn = ours_pass(wds, os.path.join(tmp, "shards", "index.json"), size, args.batch, epoch)
            ref_fn = reference_pass(paths, size, args.batch)
            ours_fn(), ref_fn()  # warm up (imports, page cache)
            ours, ref = [], []
            for _ in range(args.rounds):  # alternate, so both see the same machine load
                ours.append(timed(ours_fn, args.seconds))
                ref.append(timed(ref_fn, args.seconds))
            row = {
                "ours_img_s": statistics.median(ours),
                "reference_img_s": statistics.median(ref),
                "ratio": statistics.median(o / r for o, r in zip(ours, ref)),  # paired rounds
            }
            if not args.no_decoders:
                data = [open(pth, "rb").read() for pth in paths]
                row["decoders_img_s"] = {}
                candidates = decoder_candidates(size)
                times = {d: [] for d in candidates}
                for _ in range(args.rounds):  # interleaved, like the pipelines
                    for dname, fn in candidates.items():
                        counter = [0]

                        def one(fn=fn, counter=counter, data=data):
                            fn(data[counter[0] % len(data)], counter[0])
                            counter[0] += 1
                            return 1

                        times[dname].append(timed(one, args.seconds / 2))
                row["decoders_img_s"] = {d: statistics.median(t) for d, t in times.items()}
            results["sizes"][name] = row

    print()
    print(f"{'size':<10} {'ours img/s':>11} {'torchvision img/s':>18} {'ratio':>7}   (goal >= 1.0)")
    for name, row in results["sizes"].items():
        print(f"{name:<10} {row['ours_img_s']:>11.1f} {row['reference_img_s']:>18.1f} {row['ratio']:>7.2f}")
    if not args.no_decoders:
        names = list(next(iter(results["sizes"].values()))["decoders_img_s"])
        print()
        print("decode + crop + flip + normalise of one JPEG, img/s:")
        print(f"{'size':<10} " + " ".join(f"{n:>15}" for n in names))
        for name, row in results["sizes"].items():
            print(f"{name:<10} " + " ".join(f"{row['decoders_img_s'][n]:>15.1f}" for n in names))
    print("MFU: n/a (no model FLOPs)")
    if args.out:
        write_json(args.out, results)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
