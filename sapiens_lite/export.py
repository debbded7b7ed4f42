"""Export a pose model to a `torch.export` program (.pt2) or an ONNX file (.onnx), and load either back.

    export_model(model, "pose.pt2")                     # torch.export, dynamic batch, fp32 on CPU
    export_model(model, "pose.pt2", device="cuda", dtype=torch.bfloat16)
    export_model(model, "pose.onnx")                    # ONNX (torch.onnx dynamo exporter), dynamic batch
    model = load_exported("pose.onnx")                  # onnxruntime (the `onnx` extra); or a .pt2
    heatmaps = model(x)                                 # x [B, 3, H, W] normalised crops -> [B, K, H/4, W/4]
    PoseEstimator.from_pretrained("pose.onnx")          # the same prediction path as an eager model

Both files hold `PoseModel.forward`: normalised crops [B, 3, H, W] (any B from 1 to `max_batch`) ->
heatmaps [B, K, H/4, W/4]; crop, normalisation, flip test and decoding stay in Python
(`sapiens_lite.predict`). Each file carries the model's config.json entries (config, keypoint scheme,
mean/std; under `sapiens_config.json` in the .pt2 archive, in the ONNX model's metadata_props), so
`load_exported` rebuilds the `PoseConfig` and the scheme without the checkpoint.

Tolerance (checked by tests/sapiens_lite/test_export.py on the current torch release): the heatmaps of a
loaded export match the eager model's within `TOLERANCE[format]` x max |eager heatmap| (fp32, same
device); the .pt2 program runs the same kernels as eager, ONNX Runtime its own.

ONNX files are fp32; a .pt2 program keeps the device and dtype it was exported with (export it on the
GPU, in bf16, for GPU inference). ONNX models over 2 GB store their weights next to the file
(`<name>.onnx.data`), as the ONNX format requires.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from sapiens_lite.codec import flip_heatmaps
from sapiens_lite.errors import UserError

FORMATS = {"torch": ".pt2", "onnx": ".onnx"}
EXPORT_SUFFIXES = tuple(FORMATS.values())
METADATA_FILE = "sapiens_config.json"  # extra file of the .pt2 archive
METADATA_KEY = "sapiens_config"  # ONNX metadata_props key
TOLERANCE = {"torch": 1e-5, "onnx": 1e-4}  # max |export - eager| / max |eager|, fp32 heatmaps
INPUT_NAME, OUTPUT_NAME = "pixel_values", "heatmaps"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def export_metadata(model, fmt: str, dtype: torch.dtype, device: torch.device) -> dict:
    """What a loader needs besides the graph: config.json's entries plus how the file was made."""
    from sapiens_lite.config import config_to_dict

    return {
        "model_type": model.model_type,
        "config": config_to_dict(model.config),
        **model.hub_metadata(),
        "export": {
            "format": fmt,
            "dtype": DTYPE_NAMES[dtype],
            "device": device.type,
            "torch_version": torch.__version__.split("+")[0],
            "input": f"{INPUT_NAME} [B, 3, {model.config.input_size[0]}, {model.config.input_size[1]}] normalised",
            "output": f"{OUTPUT_NAME} [B, K, {model.config.heatmap_size[0]}, {model.config.heatmap_size[1]}]",
        },
    }


def export_model(
    model,
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    max_batch: int = 1024,
) -> Path:
    """Write `model` (a `PoseModel`) to `path` as a .pt2 program or an .onnx file, batch dimension dynamic.

    fmt: "torch" or "onnx" (default: from the suffix). The file appears complete or not at all (written
    into a temporary folder beside it, then moved).
    """
    path = Path(path)
    fmt = fmt or next((f for f, s in FORMATS.items() if path.suffix.lower() == s), None)
    if fmt not in FORMATS:
        raise UserError(
            f"{path}: export format must be torch (.pt2) or onnx (.onnx), got {fmt or path.suffix!r}"
        )
    if path.suffix.lower() != FORMATS[fmt]:
        raise UserError(f"{path}: a {fmt} export is a {FORMATS[fmt]} file")
    device = torch.device(device)
    if fmt == "onnx" and dtype != torch.float32:
        raise UserError("--dtype: ONNX exports are fp32 (use --format torch for bf16 / fp16)")
    model = model.to(device=device, dtype=dtype).eval()
    h, w = model.config.input_size
    # An example batch of 2: torch.export specialises a dimension whose example size is 0 or 1.
    example = torch.randn(2, 3, h, w, device=device, dtype=dtype)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    meta = json.dumps(export_metadata(model, fmt, dtype, device))

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with torch.no_grad():
            if fmt == "torch":
                program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
                torch.export.save(program, tmp / path.name, extra_files={METADATA_FILE: meta})
            else:
                _export_onnx(model, example, batch, meta, tmp / path.name)
        for f in sorted(tmp.iterdir()):  # the file, and an ONNX model's external weights
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _export_onnx(model, example: torch.Tensor, batch, meta: str, dst: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError(
            "ONNX export needs onnx and onnxscript: pip install 'sapiens-toolkit[onnx]'"
        ) from None
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
    )
    program.model.metadata_props[METADATA_KEY] = meta
    program.save(str(dst))


# ---- loading back ----------------------------------------------------------------------------------


class ExportedPoseModel:
    """An exported pose model with what prediction uses of a `PoseModel`: `config`, `scheme`, `device`,
    `dtype`, `__call__` (heatmaps) and `predict` (flip test)."""

    def __init__(self, path: Path, info: dict, runner, fmt: str, device: torch.device, dtype: torch.dtype):
        from sapiens_lite.config import config_from_dict
        from sapiens_lite.keypoints import get_scheme, register_scheme
        from sapiens_lite.models.pose import SCHEME_DEFINITION_KEY, PoseConfig

        if info.get("model_type") != "pose" or not isinstance(info.get("config"), dict):
            raise UserError(f"{path}: not a pose model exported by sapiens (no pose config in its metadata)")
        definition = info.get(SCHEME_DEFINITION_KEY)
        if definition is not None:
            register_scheme(
                info["config"].get("scheme"), definition, source=f"{path}: {SCHEME_DEFINITION_KEY}"
            )
        try:
            self.config = config_from_dict(PoseConfig, info["config"])
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        self.scheme = get_scheme(self.config.scheme)
        self.path = path
        self.format = fmt
        self.runner = runner
        self.device = device
        self.dtype = dtype

    def to(self, device) -> ExportedPoseModel:
        """Run on `device`: a .pt2 program's module is moved there; ONNX picks onnxruntime's CUDA provider
        for "cuda" (its tensors come back on the CPU)."""
        device = torch.device(device)
        if self.format == "torch" and device != self.device:
            self.runner = self.runner.to(device)
            self.device = device
        elif self.format == "onnx":
            self.runner.set_device(device)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] normalised crops -> heatmaps [B, K, H/4, W/4]."""
        return self.runner(x)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, flip_test: bool | None = None) -> torch.Tensor:
        """As `PoseModel.predict`: with flip test, the mean with the mirror image's heatmaps mapped back."""
        flip_test = self.config.flip_test if flip_test is None else flip_test
        if not flip_test:
            return self(images)
        heatmaps, flipped = self(torch.cat([images, images.flip(-1)], dim=0)).chunk(2, dim=0)
        return 0.5 * (heatmaps + flip_heatmaps(flipped, self.scheme.flip_index))


class _OnnxRunner:
    """onnxruntime session: torch in, torch out (on the CPU)."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = path
        self.ort = ort
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def set_device(self, device: torch.device) -> None:
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in self.ort.get_available_providers():
                raise UserError(
                    f"{self.path}: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)"
                )
            self.session = self.ort.InferenceSession(
                str(self.path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)


def read_export_metadata(path: str | os.PathLike) -> dict:
    """The metadata dict an exported file carries (see `export_metadata`)."""
    path = Path(path)
    if path.suffix.lower() == FORMATS["torch"]:
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None)
                text = z.read(name).decode() if name else None
        except zipfile.BadZipFile:
            raise UserError(f"{path}: not a torch.export archive (.pt2)") from None
    else:
        try:
            import onnx
        except ImportError:
            raise UserError("reading an ONNX file needs onnx: pip install 'sapiens-toolkit[onnx]'") from None
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise UserError(f"{path}: not an ONNX file ({type(e).__name__})") from None
        text = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), None)
    if text is None:
        raise UserError(f"{path}: carries no sapiens metadata; export it with `sapiens export`")
    return json.loads(text)


def load_exported(path: str | os.PathLike, *, device=None) -> ExportedPoseModel:
    """A .pt2 or .onnx file written by `export_model`, ready for `sapiens_lite.predict` / `PoseEstimator`.

    device: where to run (default: a .pt2 where it was exported, ONNX on the CPU).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: exported model not found")
    fmt = next((f for f, s in FORMATS.items() if path.suffix.lower() == s), None)
    if fmt is None:
        raise UserError(f"{path}: expected a .pt2 (torch.export) or .onnx file")
    info = read_export_metadata(path)
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[info.get("export", {}).get("dtype", "fp32")]
    if fmt == "torch":
        program = torch.export.load(str(path))
        exported_on = torch.device(info.get("export", {}).get("device", "cpu"))
        model = ExportedPoseModel(path, info, program.module(), fmt, exported_on, dtype)
    else:
        try:
            runner = _OnnxRunner(path)
        except ImportError:
            raise UserError(
                "running an ONNX model needs onnxruntime: pip install 'sapiens-toolkit[onnx]'"
            ) from None
        model = ExportedPoseModel(path, info, runner, fmt, torch.device("cpu"), torch.float32)
    if device is not None:
        model.to(device)
    return model
