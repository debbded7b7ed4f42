"""MAE training throughput: our `pretrain.mae` against transformers' `ViTMAEForPreTraining`.

Same encoder/decoder sizes, resolution, batch, precision, mask ratio (0.75) and loss (norm-pix MSE on
the masked patches); each timed step is zero_grad + forward + backward + AdamW step. Both models run
in this one process on the same device; the figures are img/s (median step), their ratio, and MFU
against a matmul peak measured in the same run (bench/_peak.py).

    python bench/mae_throughput.py                                   # CPU, vit_small 224x224, batch 8, fp32
    python bench/mae_throughput.py --profile                         # + where the time goes (torch.profiler)
    python bench/mae_throughput.py --device cuda --arch sapiens_0.3b --size 1024 768 --dtype bf16 --batch 16
    python bench/mae_throughput.py --device cuda --find-largest      # largest batch per Sapiens size in 80 GB
    bash bench/gpu_check.sh                                           # all GPU figures in one go (device tool)

`--compile` adds compiled rows in the same run: ours the way `engine.compile` trains it (each block's
forward compiled, `sapiens_train.engine.compile_blocks`), transformers with `torch.compile(model)`;
`--compile-full` adds ours with `torch.compile(model)`, to see what compiling beyond the blocks would add.

MFU counts model FLOPs (`pretrain.mae.mae_train_flops`: encoder on the 25% visible tokens, decoder on
all tokens, x3 for forward + backward), the same numerator for both implementations.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._peak import device_name, measure_matmul_peak, mfu, write_json  # noqa: E402
from pretrain.mae import MaskedAutoencoder, mae_config, mae_train_flops  # noqa: E402
from sapiens_train.engine import compile_blocks  # noqa: E402
from sapiens_train.monitor import peak_memory_gib  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_ours(args) -> tuple[torch.nn.Module, object]:
    cfg = mae_config(
        args.arch,
        img_size=tuple(args.size),
        decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads,
        mask_ratio=0.75,
        norm_pix_loss=True,
    )
    return MaskedAutoencoder(cfg), cfg


def build_reference(args, cfg) -> torch.nn.Module:
    """transformers ViTMAEForPreTraining of the same size (its default attention: SDPA)."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    enc = cfg.encoder.resolved()
    h, w = args.size
    hf_cfg = ViTMAEConfig(
        hidden_size=enc.embed_dim,
        num_hidden_layers=enc.depth,
        num_attention_heads=enc.num_heads,
        intermediate_size=int(enc.embed_dim * enc.mlp_ratio),
        image_size=h,  # transformers builds a square grid; non-square inputs go through interpolate_pos_encoding
        patch_size=enc.patch_size,
        qkv_bias=True,
        layer_norm_eps=1e-6,
        decoder_hidden_size=cfg.decoder_dim,
        decoder_num_hidden_layers=cfg.decoder_depth,
        decoder_num_attention_heads=cfg.decoder_heads,
        decoder_intermediate_size=int(cfg.decoder_dim * cfg.decoder_mlp_ratio),
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        attn_implementation="sdpa",
    )
    return ViTMAEForPreTraining(hf_cfg)


def make_step(model, opt, imgs, dtype, device, ours: bool, non_square: bool):
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            if ours:
                loss = model(imgs)[0]
            else:
                loss = model(pixel_values=imgs, interpolate_pos_encoding=non_square).loss
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(step, device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def profile(step, device, name: str, rows: int = 15) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        for _ in range(2):
            step()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n--- profile: {name} (2 steps, sorted by {key}) ---")
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def optimizer_for(model, device, fused: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw), "AdamW fused"
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(params, **kw), "AdamW (torch default: foreach)"


def run_compare(args) -> None:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    peak = measure_matmul_peak(device, dtype)
    imgs = torch.randn(args.batch, 3, *args.size, device=device)
    non_square = args.size[0] != args.size[1]

    ours, cfg = build_ours(args)
    flops_per_img = mae_train_flops(cfg)
    models = {"ours": ours, "transformers": build_reference(args, cfg)}
    # Separate copies with the same weights, so eager and compiled rows share the run.
    if args.compile:
        models["ours+compile"] = copy.deepcopy(ours)
        models["transformers+compile"] = copy.deepcopy(models["transformers"])
    if args.compile_full:
        models["ours+compile-full"] = copy.deepcopy(ours)
    steps, results = {}, {}
    for name, model in models.items():
        is_ours = name.startswith("ours")
        if args.checkpointing:
            if is_ours:
                model.set_grad_checkpointing(True)
            else:
                model.gradient_checkpointing_enable()
        model.to(device).train()
        opt, opt_name = optimizer_for(model, device, fused=is_ours or args.fused_reference)
        fwd = model
        if name == "ours+compile":
            compile_blocks(model)  # what engine.compile does
        elif name in ("transformers+compile", "ours+compile-full"):
            fwd = torch.compile(model)
        steps[name] = (make_step(fwd, opt, imgs, dtype, device, is_ours, non_square), opt_name)
    # Interleave the two (A, B, A, B, ...): on a shared or throttling machine both see the same load.
    times = {name: [] for name in steps}
    failed = set()
    for i in range(args.warmup + args.steps):
        for name, (step, _) in steps.items():
            if name in failed:
                continue
            try:
                t = time_steps(step, device, 0, 1)[0]
            except Exception as e:  # keep the other implementation's figure when one fails (e.g. OOM)
                print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                failed.add(name)
                continue
            if i >= args.warmup:
                times[name].append(t)
    peak = max(peak, measure_matmul_peak(device, dtype))  # best of before / after
    for name, (step, opt_name) in steps.items():
        if name in failed:
            results[name] = None
            continue
        med = statistics.median(times[name])
        results[name] = dict(step_s=med, img_s=args.batch / med, opt=opt_name)
        if args.profile:
            profile(step, device, name)

    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"\nMAE training throughput: {args.arch} ({n_params / 1e6:.1f} M params with decoder), "
        f"{args.size[0]}x{args.size[1]}, batch {args.batch}, {args.dtype}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else f' ({torch.get_num_threads()} threads)'}"
        f", decoder {cfg.decoder_dim}d{cfg.decoder_depth}b, mask 0.75, norm-pix loss"
        f"{', activation checkpointing' if args.checkpointing else ''}"
    )
    print(
        f"model FLOPs per training image: {flops_per_img / 1e9:.2f} GFLOP; measured matmul peak {peak:.2f} TFLOP/s ({args.dtype})"
    )
    print(f"{'impl':<22}{'step ms':>10}{'img/s':>10}{'MFU':>8}  optimizer")
    for name in models:
        r = results.get(name)
        if r is None:
            print(f"{name:<22}{'failed':>10}")
            continue
        u = mfu(r["img_s"] * flops_per_img, peak)
        print(f"{name:<22}{r['step_s'] * 1e3:>10.1f}{r['img_s']:>10.2f}{u:>8.1%}  {r['opt']}")
    for suffix in ("", "+compile", "+compile-full"):
        a, b = results.get("ours" + suffix), results.get("transformers" + suffix.replace("-full", ""))
        if a and b:
            print(f"speed-up ours{suffix} / transformers{suffix}: {a['img_s'] / b['img_s']:.2f}x")
    if device.type == "cuda":
        print(f"peak GPU memory of the run: {peak_memory_gib(device):.1f} GiB")
    if args.out:  # for bench/run_all.py
        rows = {
            name: None if r is None else {**r, "mfu": mfu(r["img_s"] * flops_per_img, peak)}
            for name, r in results.items()
        }
        write_json(
            args.out,
            {
                "benchmark": "mae_training",
                "device": device_name(device),
                "arch": args.arch,
                "size": list(args.size),
                "batch": args.batch,
                "dtype": args.dtype,
                "decoder": f"{cfg.decoder_dim}d{cfg.decoder_depth}b",
                "steps": args.steps,
                "peak_tflops": peak,
                "flops_per_image": flops_per_img,
                "rows": rows,
            },
        )


def find_largest(args) -> None:
    """Largest power-of-two batch (1, 2, 4, ...) of each Sapiens size that trains a step within `--memory-gb`.

    One model + fused AdamW per size (fp32 weights and state, bf16 autocast, activation checkpointing);
    the batch doubles until a step runs out of memory. The optimizer state is allocated by the first
    step and stays, as in training.
    """
    device = torch.device(args.device)
    cuda = device.type == "cuda"  # on a CPU (a smoke test of this code) nothing runs out: up to --max-batch
    if cuda and device.index is None:  # set_per_process_memory_fraction wants an index, not plain "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb * 2**30 / total), device)
    dtype = DTYPES[args.dtype]
    rows = []
    for arch in args.archs:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        args.arch = arch
        with torch.device(device):  # initialise on the GPU: seconds instead of minutes for 2B parameters
            model, cfg = build_ours(args)
        model.set_grad_checkpointing(True)
        if args.compile:
            compile_blocks(model)
        model.train()
        opt, _ = optimizer_for(model, device, fused=True)
        best, stats, batch = 0, None, 1
        while batch <= args.max_batch:
            peak_memory_gib(device)  # resets the CUDA peak
            try:
                imgs = torch.randn(batch, 3, *args.size, device=device)
                step = make_step(model, opt, imgs, dtype, device, True, False)
                times = time_steps(step, device, 1, 1)
            except torch.OutOfMemoryError:
                break
            finally:
                imgs = step = None
                opt.zero_grad(set_to_none=True)
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            img_s = batch / statistics.median(times)
            best = batch
            stats = (peak_memory_gib(device), img_s, mfu(img_s * mae_train_flops(cfg), args.peak))
            print(f"  {arch} batch {batch}: {stats[0]:.1f} GiB, {img_s:.1f} img/s", flush=True)
            batch *= 2
        rows.append((arch, best, stats))
        del model, opt
    print(
        f"\nLargest batch per device within {args.memory_gb:g} GiB ({args.dtype} autocast, fp32 weights + AdamW state, "
        f"activation checkpointing{', compiled blocks' if args.compile else ''}, {args.size[0]}x{args.size[1]}), "
        f"{torch.cuda.get_device_name(device) if cuda else 'cpu'}, matmul peak {args.peak:.3g} TFLOP/s:"
    )
    print(f"{'arch':<14}{'batch':>6}{'peak GiB':>10}{'img/s':>8}{'MFU':>7}")
    for arch, best, st in rows:
        if st is None:
            print(f"{arch:<14}{'none':>6}  (batch 1 does not fit)")
        else:
            batch = f"{best}+" if best == args.max_batch else str(best)
            print(f"{arch:<14}{batch:>6}{st[0]:>10.1f}{st[1]:>8.1f}{st[2]:>7.1%}")
    if any(best == args.max_batch for _, best, _ in rows):
        print(f"(N+: every batch up to --max-batch {args.max_batch} fitted; a larger one may too)")
    if args.out:  # for bench/run_all.py
        write_json(
            args.out,
            {
                "benchmark": "largest_batch",
                "device": device_name(device),
                "memory_gb": args.memory_gb,
                "size": list(args.size),
                "dtype": args.dtype,
                "compile": args.compile,
                "max_batch": args.max_batch,
                "peak_tflops": args.peak,
                "rows": [
                    {"arch": arch, "batch": best, "capped": best == args.max_batch}
                    | ({} if st is None else {"peak_gib": st[0], "img_s": st[1], "mfu": st[2]})
                    for arch, best, st in rows
                ],
            },
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="vit_small", help="encoder arch (sapiens_lite.models.vit.ARCHS)")
    p.add_argument("--size", type=int, nargs=2, default=[224, 224], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--decoder-dim", type=int, default=512)
    p.add_argument("--decoder-depth", type=int, default=8)
    p.add_argument("--decoder-heads", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both models")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add compiled rows (ours: engine.compile's per-block compile; transformers: whole model)",
    )
    p.add_argument(
        "--compile-full",
        action="store_true",
        help="add a row of ours with torch.compile(model) (masking, loss and embeddings compiled too)",
    )
    p.add_argument(
        "--fused-reference",
        action="store_true",
        help="give transformers the fused AdamW too (isolates the model)",
    )
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table per implementation")
    p.add_argument("--out", help="also write the figures as JSON here (bench/run_all.py reads it)")
    p.add_argument(
        "--find-largest", action="store_true", help="largest batch of sapiens_0.3b..2b in --memory-gb"
    )
    p.add_argument(
        "--memory-gb",
        type=float,
        default=79.1,
        help="GiB a --find-largest step may use (an 80 GB H100 has 79.1; caps an H200 to it)",
    )
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--archs", nargs="+", default=["sapiens_0.3b", "sapiens_0.6b", "sapiens_1b", "sapiens_2b"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.find_largest:
        if args.size == [224, 224]:
            args.size = [1024, 768]
        args.dtype = "bf16" if args.dtype == "fp32" and args.device == "cuda" else args.dtype
        args.peak = measure_matmul_peak(torch.device(args.device), DTYPES[args.dtype])
        find_largest(args)
    else:
        run_compare(args)


if __name__ == "__main__":
    main()
