import time, json, os, torch
from sapiens_lite import codec
from sapiens_lite.models.pose import build_pose_model
from finetune.losses import build_loss, LossConfig
dev = "cuda"
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
torch.manual_seed(0)
def sync(): torch.cuda.synchronize()
def timeit(f, n=10):
    f(); sync(); t = time.perf_counter()
    for _ in range(n): f()
    sync(); return (time.perf_counter() - t) / n * 1000
# 1. codec on GPU == CPU, round trip
H, W = 1024, 768; hm = (256, 192)
lo = torch.tensor([8 * 767 / 191, 8 * 1023 / 255]); hi = torch.tensor([(191 - 8) * 767 / 191, (255 - 8) * 1023 / 255])
k = lo + torch.rand(8, 308, 2) * (hi - lo)
hmaps, w = codec.encode_heatmaps(k.to(dev), torch.ones(8, 308, device=dev), (H, W), hm, 6.0)
dec, sc = codec.decode_heatmaps(hmaps, input_size=(H, W))
out["roundtrip_max_err_px_cuda"] = (dec.cpu() - k).norm(dim=-1).max().item()
noisy = hmaps[:2] + 0.05 * torch.rand_like(hmaps[:2])
d_gpu, _ = codec.decode_heatmaps(noisy); d_cpu, _ = codec.decode_heatmaps(noisy.cpu())
out["gpu_vs_cpu_decode_max_diff"] = (d_gpu.cpu() - d_cpu).abs().max().item()
# 2. decode timing: B=32 people x 308 at 256x192 and 64x48
for size in [(256, 192), (64, 48)]:
    x = torch.rand(32, 308, *size, device=dev, dtype=torch.bfloat16)
    out[f"decode_ms_per_batch32_{size[0]}x{size[1]}"] = timeit(lambda: codec.decode_heatmaps(x))
    out[f"encode_ms_per_batch32_{size[0]}x{size[1]}"] = timeit(lambda: codec.encode_heatmaps(k[:1].expand(32, -1, -1).to(dev), torch.ones(32, 308, device=dev), (size[0] * 4, size[1] * 4), size, 6.0))
# 3. sapiens_0.3b goliath308 predict with flip test, bf16
model = build_pose_model("sapiens_0.3b", "goliath308", input_size=(1024, 768)).to(dev)
model.eval()
img = torch.randn(8, 3, 1024, 768, device=dev)
with torch.autocast("cuda", dtype=torch.bfloat16):
    p = model.predict(img)
    out["predict_shape"] = list(p.shape)
    out["predict_flip_ms_batch8"] = timeit(lambda: model.predict(img), n=5)
    out["predict_noflip_ms_batch8"] = timeit(lambda: model.predict(img, flip_test=False), n=5)
out["predict_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
# 4. train step with OHKM loss
model.train(); torch.cuda.reset_peak_memory_stats()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
loss_fn = build_loss(LossConfig(kind="ohkm_mse", topk=128))
tgt, tw = codec.encode_heatmaps(k.to(dev), torch.ones(8, 308, device=dev), (H, W), hm, 6.0)
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        pred = model(img)
    loss = loss_fn(pred, tgt, tw)
    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    return loss
losses = [step().item() for _ in range(3)]
out["train_losses"] = losses
out["train_step_ms_batch8"] = timeit(step, n=3)
out["train_peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "h7_gpu.json"), "w"), indent=1)
