"""Pose inference speed: our `PoseEstimator` against transformers' `VitPoseForPoseEstimation`, and decoding.

Two parts, both in this one process:

1. decode: heatmaps -> keypoints in image pixels (argmax + DARK-UDP + back to the image) for K keypoints
   (308 by default) at 1024x768 input (256x192 heatmaps), batched torch, in ms per person; next to it
   the flip-test merge, and two references on the same heatmaps: a per-keypoint numpy/cv2 loop of
   mmpose's `refine_keypoints_dark_udp` (what the Sapiens lite demo runs) and transformers'
   `VitPoseImageProcessor.post_process_pose_estimation` (scipy).
2. end-to-end: images/s of crop + model + decode for images with one person box each: ours
   (`PoseEstimator.predict` over a stream of images, crops cut while the previous batch runs) against
   transformers (`VitPoseImageProcessor` -> `VitPoseForPoseEstimation` -> `post_process_pose_estimation`),
   plus model-only rows (the same normalised batch through both models). Same backbone size, input,
   batch, precision and weights: the transformers model is built at the arch's size with its classic
   decoder (two deconvolutions, our "vitpose" head) and its weights are converted into ours, checked to
   give the same heatmaps (its backbone attends through SDPA, as ours). No flip test (transformers has none). MFU: model FLOPs (backbone + head,
   counted by torch.utils.flop_counter on our model, the same numerator for both) x images/s over a
   matmul peak measured in the same run (bench/_peak.py).

    python bench/inference.py                                    # CPU: decode K=308, vit_base 256x192 batch 8 fp32
    python bench/inference.py --part decode                      # decode only
    python bench/inference.py --archs vit_small --steps 3        # a quicker CPU run
    python bench/inference.py --device cuda                      # GPU: sapiens_0.3b + sapiens_1b, 1024x768, bf16,
                                                                 #   batch 32, eager and compiled rows
    python bench/inference.py --out inference.json               # also the figures as JSON (bench/run_all.py)

On a GPU the defaults are sapiens_0.3b and sapiens_1b at 1024x768 in bf16 with compiled rows (`--no-compile`
to skip them); transformers' heatmaps are cast to fp32 before its numpy post-processing (numpy has no bf16).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._peak import device_name, measure_matmul_peak, mfu, write_json  # noqa: E402
from sapiens_lite import codec  # noqa: E402
from sapiens_lite.estimator import PoseEstimator  # noqa: E402
from sapiens_lite.predict import crops_to_image  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, steps: int) -> float:
    """Median seconds of `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---- 1. decode -------------------------------------------------------------------------------------


def mmpose_loop_decode(heatmaps: np.ndarray, blur_kernel_size: int = 11) -> np.ndarray:
    """mmpose get_heatmap_maximum + refine_keypoints_dark_udp, one keypoint at a time (numpy + cv2)."""
    import cv2

    hm = heatmaps.astype(np.float32).copy()  # [K, h, w]
    k, h, w = hm.shape
    idx = hm.reshape(k, -1).argmax(1)
    locs = np.stack([idx % w, idx // w], -1).astype(np.float64)
    border = (blur_kernel_size - 1) // 2
    for i in range(k):
        peak = hm[i].max()
        padded = np.zeros((h + 2 * border, w + 2 * border), np.float32)
        padded[border:-border, border:-border] = hm[i]
        blurred = cv2.GaussianBlur(padded, (blur_kernel_size, blur_kernel_size), 0)[
            border:-border, border:-border
        ]
        hm[i] = blurred * (peak / blurred.max())
    logm = np.log(np.clip(hm, 1e-3, 50.0))
    for i in range(k):
        p = np.pad(logm[i], 1, mode="edge")
        x, y = int(locs[i, 0]) + 1, int(locs[i, 1]) + 1
        dx, dy = 0.5 * (p[y, x + 1] - p[y, x - 1]), 0.5 * (p[y + 1, x] - p[y - 1, x])
        dxx = p[y, x + 1] - 2 * p[y, x] + p[y, x - 1]
        dyy = p[y + 1, x] - 2 * p[y, x] + p[y - 1, x]
        dxy = 0.5 * (
            p[y + 1, x + 1]
            - p[y, x + 1]
            - p[y + 1, x]
            + 2 * p[y, x]
            - p[y, x - 1]
            - p[y - 1, x]
            + p[y - 1, x - 1]
        )
        hess = np.array([[dxx, dxy], [dxy, dyy]]) + np.finfo(np.float32).eps * np.eye(2)
        locs[i] -= np.linalg.inv(hess) @ np.array([dx, dy])
    return locs


def synthetic_heatmaps(batch: int, k: int, hw: tuple[int, int], device, dtype) -> torch.Tensor:
    """Gaussian peaks (sigma 6) at random places plus noise: the shape of real heatmaps."""
    g = torch.Generator().manual_seed(0)
    h, w = hw
    centers = torch.rand(batch, k, 2, generator=g) * torch.tensor([w - 1, h - 1])
    ys = torch.arange(h).view(1, 1, h, 1)
    xs = torch.arange(w).view(1, 1, 1, w)
    hm = torch.exp(
        -((xs - centers[..., 0, None, None]) ** 2 + (ys - centers[..., 1, None, None]) ** 2) / (2 * 6.0**2)
    )
    hm = hm + 0.01 * torch.randn(hm.shape, generator=g)
    return hm.to(device=device, dtype=dtype)


def run_decode(args, device) -> dict:
    """Prints the decode table; returns its figures in ms per person (`--out`)."""
    k, input_size, b = args.keypoints, (1024, 768), args.decode_batch
    hm_size = (input_size[0] // 4, input_size[1] // 4)
    centers = np.tile([[640.0, 360.0]], (b, 1))
    scales = np.tile([[450.0, 600.0]], (b, 1))
    flip_index = list(range(k))
    print(
        f"\nDecoding {k} keypoints per person, heatmaps {hm_size[0]}x{hm_size[1]} (input {input_size[0]}x"
        f"{input_size[1]}), batch {b}, device {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
    )
    print(f"{'what':<58}{'ms/person':>10}")
    figures = {"keypoints": k, "heatmap_size": list(hm_size), "batch": b, "ms_per_person": {}}
    ms = figures["ms_per_person"]
    for name in args.decode_dtypes:
        hm = synthetic_heatmaps(b, k, hm_size, device, DTYPES[name])

        def ours(hm=hm):
            xy, s = codec.decode_heatmaps(hm, input_size=input_size)
            return crops_to_image(xy, centers, scales, input_size), s

        t = timed(ours, device, 2, args.decode_steps)
        print(f"{'ours: decode + to image (torch, batched), ' + name + ' heatmaps':<58}{t / b * 1e3:>10.2f}")
        ms[f"ours {name}"] = t / b * 1e3
        merge = timed(
            lambda hm=hm: 0.5 * (hm + codec.flip_heatmaps(hm, flip_index)), device, 1, args.decode_steps
        )
        print(f"{'ours: flip-test merge (mean with the mirrored maps), ' + name:<58}{merge / b * 1e3:>10.2f}")
        ms[f"ours flip merge {name}"] = merge / b * 1e3
    hm1 = synthetic_heatmaps(1, k, hm_size, "cpu", torch.float32)[0].numpy()
    t = timed(lambda: mmpose_loop_decode(hm1), torch.device("cpu"), 0, 1)
    print(f"{'reference: mmpose DARK-UDP per keypoint (numpy + cv2), 1 person':<58}{t * 1e3:>10.2f}")
    ms["mmpose"] = t * 1e3
    try:
        from transformers import VitPoseImageProcessor
        from transformers.models.vitpose.modeling_vitpose import VitPoseEstimatorOutput
    except ImportError:
        return figures
    proc = VitPoseImageProcessor(size={"height": input_size[0], "width": input_size[1]})
    out = VitPoseEstimatorOutput(heatmaps=torch.from_numpy(hm1)[None])
    t = timed(
        lambda: proc.post_process_pose_estimation(out, boxes=[[[100.0, 50.0, 360.0, 480.0]]]),
        torch.device("cpu"),
        0,
        1,
    )
    print(f"{'reference: transformers post_process_pose_estimation, 1 person':<58}{t * 1e3:>10.2f}")
    ms["transformers"] = t * 1e3
    return figures


# ---- 2. end-to-end ---------------------------------------------------------------------------------


def build_pair(arch: str, size: tuple[int, int], k: int, device, dtype):
    """(transformers VitPoseForPoseEstimation, our PoseModel) of `arch`'s size with the same weights."""
    from transformers import VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation

    from sapiens_lite.convert import build_pose_model, convert_state_dict
    from sapiens_lite.keypoints import scheme_for_num_keypoints
    from sapiens_lite.models.vit import ViTConfig

    vit = ViTConfig(arch=arch, img_size=size).resolved()
    backbone = VitPoseBackboneConfig(
        hidden_size=vit.embed_dim,
        num_hidden_layers=vit.depth,
        num_attention_heads=vit.num_heads,
        intermediate_size=int(vit.embed_dim * vit.mlp_ratio),
        image_size=list(size),
        patch_size=[16, 16],
        layer_norm_eps=1e-6,
        out_indices=[vit.depth],
    )
    cfg = VitPoseConfig(backbone_config=backbone, use_simple_decoder=False, num_labels=k)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: seconds instead of minutes for 1B parameters
        ref = VitPoseForPoseEstimation(cfg)
        with torch.no_grad():  # heatmaps of order 1, so that the parity check below means something
            for name, p in ref.named_parameters():
                if name.startswith("head."):
                    p.normal_(0, 0.02)
    ref = ref.eval()
    assert ref.backbone.config._attn_implementation == "sdpa", ref.backbone.config._attn_implementation
    conv = convert_state_dict(ref.state_dict())
    ours = build_pose_model(conv, scheme=scheme_for_num_keypoints(k).name, arch=arch).to(device).eval()
    x = torch.randn(2, 3, *size, device=device)
    with torch.no_grad():
        expected = ref(pixel_values=x).heatmaps
        diff = (ours(x) - expected).abs().max() / expected.abs().max()
    return ref.to(dtype), ours.to(dtype), float(diff)


def model_flops(model, size) -> float:
    """Forward FLOPs of one crop through `model` (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, *size, device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return float(counter.get_total_flops())


def run_e2e(args, arch: str, device, dtype, peak: float) -> dict:
    """Prints the end-to-end table of `arch`; returns its figures (`--out`)."""
    from transformers import VitPoseImageProcessor

    size, b, k = tuple(args.size), args.batch, args.keypoints
    ref, ours, diff = build_pair(arch, size, k, device, dtype)
    flops = model_flops(ours, size)
    n_images = b * args.e2e_batches
    rng = np.random.default_rng(0)
    ih, iw = args.image_size
    images = [rng.integers(0, 256, (ih, iw, 3), dtype=np.uint8) for _ in range(n_images)]
    box = [iw * 0.3, ih * 0.1, iw * 0.35, ih * 0.8]  # one person box (x, y, w, h) per image
    boxes = [[box] for _ in images]
    proc = VitPoseImageProcessor(size={"height": size[0], "width": size[1]})
    x = torch.randn(b, 3, *size, device=device, dtype=dtype)

    def transformers_e2e(model):
        def run():
            for i in range(0, n_images, b):
                inputs = proc(images[i : i + b], boxes=boxes[i : i + b], return_tensors="pt")
                with torch.inference_mode():
                    out = model(pixel_values=inputs["pixel_values"].to(device, dtype))
                out.heatmaps = out.heatmaps.float()  # numpy (their post-processing) has no bf16
                proc.post_process_pose_estimation(out, boxes=boxes[i : i + b])

        return run

    # Model rows run under inference_mode, as the estimator does (a compiled graph is specialised on it).
    def transformers_model(model):
        def run():
            with torch.inference_mode():
                model(pixel_values=x)

        return run

    def ours_e2e(estimator):
        return lambda: estimator.predict(images, boxes)

    def ours_model(model):
        def run():
            with torch.inference_mode():
                model.predict(x, flip_test=False)

        return run

    est = PoseEstimator(ours, device=device, dtype=dtype, batch_size=b)
    rows = {
        "ours e2e": (ours_e2e(est), n_images),
        "transformers e2e": (transformers_e2e(ref), n_images),
        "ours model": (ours_model(ours), b),
        "transformers model": (transformers_model(ref), b),
    }
    if args.compile:
        ours_c = copy.deepcopy(ours)
        est_c = PoseEstimator(ours_c, device=device, dtype=dtype, batch_size=b, compile=True)
        ref_c = torch.compile(ref)
        rows.update(
            {
                "ours+compile e2e": (ours_e2e(est_c), n_images),
                "transformers+compile e2e": (transformers_e2e(ref_c), n_images),
                "ours+compile model": (ours_model(ours_c), b),
                "transformers+compile model": (transformers_model(ref_c), b),
            }
        )
    # Interleaved (A, B, A, B, ...): on a shared or throttling machine every row sees the same load.
    times: dict[str, list[float]] = {name: [] for name in rows}
    failed: dict[str, str] = {}
    for i in range(args.warmup + args.steps):
        for name, (fn, _) in rows.items():
            if name in failed:
                continue
            try:
                t = timed(fn, device, 0, 1)
            except Exception as e:  # keep the other rows' figures when one fails (OOM, a compile error)
                failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                continue
            if i >= args.warmup:
                times[name].append(t)

    where = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    params = sum(p.numel() for p in ours.parameters())
    print(
        f"\nEnd-to-end pose inference: {arch} ({params / 1e6:.1f} M params, classic ViTPose head), crops "
        f"{size[0]}x{size[1]}, {k} keypoints, batch {b}, {args.dtype}, device {device} ({where}); e2e = "
        f"{n_images} images of {ih}x{iw} with one box each, crop + model + decode; no flip test"
    )
    print(
        f"model FLOPs per crop: {flops / 1e9:.1f} GFLOP; measured matmul peak {peak:.2f} TFLOP/s ({args.dtype}); "
        f"heatmaps ours vs transformers (fp32, same weights): max rel diff {diff:.1e}"
    )
    print(f"{'row':<28}{'ms/step':>10}{'img/s':>10}{'MFU':>8}")
    results = {}
    figures = {
        "arch": arch,
        "params": params,
        "flops_per_crop": flops,
        "max_rel_diff": diff,
        "images_per_e2e_step": n_images,
        "image_size": [ih, iw],
        "rows": {},
    }
    for name, (_, n) in rows.items():
        if name in failed or not times[name]:
            print(f"{name:<28}{'failed':>10}  {failed.get(name, '')}")
            figures["rows"][name] = {"failed": failed.get(name, "no timed step")}
            continue
        med = statistics.median(times[name])
        results[name] = n / med
        figures["rows"][name] = {"step_s": med, "img_s": n / med, "mfu": mfu(n / med * flops, peak)}
        print(f"{name:<28}{med * 1e3:>10.1f}{n / med:>10.2f}{mfu(n / med * flops, peak):>8.1%}")
    for suffix in ("", "+compile"):
        for part in ("e2e", "model"):
            a, r = results.get(f"ours{suffix} {part}"), results.get(f"transformers{suffix} {part}")
            if a and r:
                print(f"speed-up ours{suffix} / transformers{suffix} ({part}): {a / r:.2f}x")
    a, r = results.get("ours+compile e2e"), results.get("transformers e2e")
    if a and r:
        print(f"speed-up ours+compile / transformers eager (e2e): {a / r:.2f}x")
    return figures


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--part", choices=("all", "decode", "e2e"), default="all")
    p.add_argument("--archs", nargs="+", default=None, help="cpu: vit_base; cuda: sapiens_0.3b sapiens_1b")
    p.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="cpu: 256 192; cuda: 1024 768"
    )
    p.add_argument("--batch", type=int, default=None, help="cpu: 8; cuda: 32")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cpu: fp32; cuda: bf16")
    p.add_argument("--keypoints", type=int, default=None, help="17, 133 or 308 (e2e: 17; decode: 308)")
    p.add_argument("--image-size", type=int, nargs=2, default=(720, 1280), metavar=("H", "W"))
    p.add_argument("--e2e-batches", type=int, default=4, help="images per e2e step = batch x this")
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="cpu: off; cuda: on"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=10)
    p.add_argument("--decode-dtypes", nargs="+", default=None, help="cpu: fp32; cuda: fp32 bf16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", help="also write the figures as JSON here (bench/run_all.py reads it)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.archs = args.archs or (["sapiens_0.3b", "sapiens_1b"] if gpu else ["vit_base"])
    args.size = args.size or ([1024, 768] if gpu else [256, 192])
    args.batch = args.batch or (32 if gpu else 8)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.compile = gpu if args.compile is None else args.compile
    args.decode_dtypes = args.decode_dtypes or (["fp32", "bf16"] if gpu else ["fp32"])
    results = {"benchmark": "inference", "device": device_name(device)}
    if args.part in ("all", "decode"):
        args.keypoints, keypoints = args.keypoints or 308, args.keypoints
        results["decode"] = run_decode(args, device)
        args.keypoints = keypoints
    if args.part in ("all", "e2e"):
        args.keypoints = args.keypoints or 17
        dtype = DTYPES[args.dtype]
        peak = measure_matmul_peak(device, dtype)
        results["e2e"] = {
            "size": list(args.size),
            "batch": args.batch,
            "dtype": args.dtype,
            "keypoints": args.keypoints,
            "peak_tflops": peak,
            "archs": {},
        }
        for arch in args.archs:
            results["e2e"]["archs"][arch] = run_e2e(args, arch, device, dtype, peak)
            if gpu:
                torch.cuda.empty_cache()
        print(f"\nmatmul peak re-measured after the runs: {measure_matmul_peak(device, dtype):.2f} TFLOP/s")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
