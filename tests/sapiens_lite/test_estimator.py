"""PoseEstimator: boxes -> crops -> batched model -> keypoints in image pixels.

The geometry is checked against mmpose's formulas written out here (box -> center/scale with padding 1.25
and the aspect fix, the UDP warp, UDP decoding back to the image), with a stub model whose heatmaps are
exact Gaussians at known places and which records the crops it is given.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from sapiens_lite.errors import UserError
from sapiens_lite.estimator import Person, PoseEstimator, read_image
from sapiens_lite.keypoints import get_scheme
from sapiens_lite.models.heads import HeadConfig
from sapiens_lite.models.pose import PoseConfig, build_pose_model
from sapiens_lite.models.vit import ViTConfig
from sapiens_lite.predict import Instance, predict_instances
from tests.sapiens_lite.test_topdown import mmpose_udp_warp

INPUT = (128, 96)  # (H, W)
HM = (32, 24)


class GaussianStub(torch.nn.Module):
    """A pose 'model' with exact Gaussian heatmaps at fixed heatmap-frame places; records its inputs."""

    def __init__(self, locs: np.ndarray, scheme: str = "coco17"):
        super().__init__()
        self.config = PoseConfig(backbone=ViTConfig(img_size=INPUT), input_size=INPUT, scheme=scheme)
        self.scheme = get_scheme(scheme)
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the model a device and a dtype
        self.locs = torch.as_tensor(locs, dtype=torch.float32)  # [K, 2] heatmap frame
        self.seen: list[torch.Tensor] = []
        self.flips: list[bool] = []

    def forward(self, x):
        self.seen.append(x.detach().float().clone())
        ys = torch.arange(HM[0]).view(1, HM[0], 1)
        xs = torch.arange(HM[1]).view(1, 1, HM[1])
        g = torch.exp(
            -((xs - self.locs[:, 0, None, None]) ** 2 + (ys - self.locs[:, 1, None, None]) ** 2) / 8.0
        )
        return g.expand(x.shape[0], -1, -1, -1).to(x.dtype) + 0 * self.weight.to(x.dtype)  # [B, K, h, w]

    def predict(self, x, flip_test=None):
        self.flips.append(flip_test)
        return self(x)


def stub_locs(k: int = 17, seed: int = 0) -> np.ndarray:
    """Sub-pixel heatmap places at least 8 pixels from the border (where DARK is exact to ~0.01 px)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(8, HM[1] - 9, k), rng.uniform(8, HM[0] - 9, k)], axis=1)


def mmpose_center_scale(box, aspect: float, padding: float = 1.25):
    """mmpose bbox_xywh2cs (padding 1.25) + TopdownAffine's _fix_aspect_ratio."""
    x, y, w, h = box
    center = np.array([x + w * 0.5, y + h * 0.5])
    w, h = w * padding, h * padding
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return center, np.array([w, h])


def mmpose_to_image(kpts_hm: np.ndarray, center, scale) -> np.ndarray:
    """UDPHeatmap.decode (heatmap -> input: / (hm - 1) * input) then the top-down inverse (/ input * scale + center - scale / 2)."""
    hm_wh = np.array([HM[1], HM[0]], np.float64)
    in_wh = np.array([INPUT[1], INPUT[0]], np.float64)
    kpts_in = kpts_hm / (hm_wh - 1) * in_wh
    return kpts_in / in_wh * scale + center - 0.5 * scale


def test_keypoints_land_where_mmpose_puts_them_across_images_and_batches():
    locs = stub_locs()
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in [(240, 320), (100, 90), (480, 200)]]
    boxes = [
        np.array([[10.0, 20.0, 100.0, 180.0, 0.9], [150.0, 5.0, 60.0, 60.0, 0.5]]),
        np.zeros((0, 4)),  # nobody in this one
        np.array([[0.0, 0.0, 200.0, 480.0], [30.5, 100.25, 20.0, 300.0], [-10.0, 400.0, 120.0, 50.0]]),
    ]
    results = {}
    for batch_size in (1, 2, 16):
        est = PoseEstimator(GaussianStub(locs), device="cpu", batch_size=batch_size)
        results[batch_size] = est.predict(images, boxes)
        # persons of all images share batches: ceil(5 / batch_size) model calls
        assert len(est.model.flips) == math.ceil(5 / batch_size)
    for people, img_boxes in zip(results[16], boxes):
        assert len(people) == len(img_boxes)
        for person, box in zip(people, img_boxes):
            center, scale = mmpose_center_scale(box[:4], INPUT[1] / INPUT[0])
            expected = mmpose_to_image(locs, center, scale)
            tol = 0.02 * scale[0] / (INPUT[1] - 1)  # 0.02 input pixels
            np.testing.assert_allclose(person.keypoints[:, :2], expected, atol=tol)
            peak = np.exp(-((np.round(locs) - locs) ** 2).sum(1) / 8.0)  # the heatmap at the nearest pixel
            np.testing.assert_allclose(person.keypoints[:, 2], peak, atol=1e-5)
            np.testing.assert_allclose(person.bbox, box[:4])
            assert person.bbox_score == (box[4] if len(box) == 5 else 1.0)
            assert person.names == get_scheme("coco17").names
    for batch_size in (1, 2):
        for a, b in zip(results[batch_size], results[16]):
            for pa, pb in zip(a, b):
                np.testing.assert_array_equal(pa.keypoints, pb.keypoints)


def test_crops_are_mmpose_udp_warps_normalised():
    stub = GaussianStub(stub_locs())
    est = PoseEstimator(stub, device="cpu", batch_size=8)
    img = np.random.default_rng(2).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    boxes = [[40.0, 30.0, 80.0, 150.0], [200.0, 10.0, 90.0, 40.0]]
    est(img, boxes)
    (x,) = stub.seen  # one batch of two crops, [2, 3, H, W]
    mean = np.array(stub.config.mean)
    std = np.array(stub.config.std)
    for crop, box in zip(x.numpy(), boxes):
        center, scale = mmpose_center_scale(box, INPUT[1] / INPUT[0])
        m = mmpose_udp_warp(center, scale, 0.0, (INPUT[1], INPUT[0]))
        expected = cv2.warpAffine(img, m, (INPUT[1], INPUT[0]), flags=cv2.INTER_LINEAR).astype(np.float64)
        got = crop.transpose(1, 2, 0) * std + mean
        assert np.abs(got - expected).max() < 1.01  # the same bilinear warp, up to one rounding level


def test_without_boxes_the_whole_image_or_the_detector_gives_them():
    stub = GaussianStub(stub_locs())
    img = np.zeros((60, 80, 3), np.uint8)
    (person,) = PoseEstimator(stub, device="cpu")(img)
    np.testing.assert_array_equal(person.bbox, [0, 0, 80, 60])

    calls = []

    def detector(image):
        calls.append(image.shape)
        return [[5, 6, 20, 30, 0.8], [40, 10, 30, 40, 0.4]]

    people = PoseEstimator(stub, device="cpu", detector=detector)(img)
    assert calls == [(60, 80, 3)]
    assert [p.bbox.tolist() for p in people] == [[5, 6, 20, 30], [40, 10, 30, 40]]
    assert [p.bbox_score for p in people] == [0.8, 0.4]
    # boxes given by the caller win over the detector
    people = PoseEstimator(stub, device="cpu", detector=detector)(img, boxes=[[1, 2, 3, 4]])
    assert len(calls) == 1 and people[0].bbox.tolist() == [1, 2, 3, 4]


def test_images_as_paths_arrays_pil_and_grey(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(3).integers(0, 255, (50, 40, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), rgb[:, :, ::-1])
    np.testing.assert_array_equal(read_image(path), rgb)
    np.testing.assert_array_equal(read_image(str(path)), rgb)
    np.testing.assert_array_equal(read_image(Image.fromarray(rgb)), rgb)
    grey = rgb[:, :, 0]
    np.testing.assert_array_equal(read_image(grey), np.repeat(grey[:, :, None], 3, axis=2))
    stub = GaussianStub(stub_locs())
    est = PoseEstimator(stub, device="cpu")
    a, b, c = est.predict([path, rgb, Image.fromarray(rgb)], boxes=[[[5, 5, 30, 40]]] * 3)
    np.testing.assert_array_equal(a[0].keypoints, b[0].keypoints)
    np.testing.assert_array_equal(a[0].keypoints, c[0].keypoints)
    # three crops of the same image and box
    assert torch.equal(stub.seen[0][0], stub.seen[0][1]) and torch.equal(stub.seen[0][0], stub.seen[0][2])

    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="bad.jpg"):
        est(tmp_path / "bad.jpg")
    with pytest.raises(UserError, match="not found"):
        est(tmp_path / "missing.jpg")
    with pytest.raises(UserError, match="boxes"):
        est(rgb, boxes=[[1, 2, 3]])


def test_flip_test_and_dtype_reach_the_model():
    stub = GaussianStub(stub_locs())
    est = PoseEstimator(stub, device="cpu", dtype="bf16", flip_test=True)
    img = np.zeros((64, 48, 3), np.uint8)
    (person,) = est(img)
    (person2,) = est(img, flip_test=False)
    assert stub.flips == [True, False]
    assert stub.weight.dtype == torch.bfloat16
    assert person.keypoints.dtype == np.float32
    # bf16 heatmaps: the peaks still decode to within a fraction of an input pixel
    center, scale = mmpose_center_scale([0, 0, 48, 64], INPUT[1] / INPUT[0])
    expected = mmpose_to_image(stub.locs.numpy().astype(np.float64), center, scale)
    np.testing.assert_allclose(person.keypoints[:, :2], expected, atol=0.3 * scale[0] / INPUT[1])
    with pytest.raises(UserError, match="dtype"):
        PoseEstimator(stub, device="cpu", dtype="fp8")


def tiny_pose_model(scheme: str = "coco17"):
    torch.manual_seed(0)
    model = build_pose_model("vit_test", scheme, input_size=INPUT, head=HeadConfig("vitpose", channels=16))
    with torch.no_grad():  # heatmaps of order 1 with clear maxima
        for p in model.head.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_estimator_and_evaluation_share_one_path(tmp_path):
    """`predict_instances` (evaluation, image files) and `PoseEstimator` (images in memory) agree."""
    model = tiny_pose_model()
    rng = np.random.default_rng(4)
    boxes = {"a.jpg": [[10, 20, 60, 90], [70, 5, 40, 40]], "b.png": [[0, 0, 50, 120]]}
    images = {}
    for name in boxes:
        images[name] = rng.integers(0, 255, (140, 130, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / name), images[name][:, :, ::-1])
    instances = [Instance(i, name, tuple(b)) for i, name in enumerate(boxes) for b in boxes[name]]
    kpts, scores, ok = predict_instances(
        model, instances, tmp_path, flip_test=True, batch_size=2, progress=False
    )
    assert ok.all()
    # the same batches (persons in the same order, two at a time), so the same arithmetic
    est = PoseEstimator(model, device="cpu", flip_test=True, batch_size=2)
    people = est.predict([tmp_path / n for n in boxes], [boxes[n] for n in boxes])
    got = np.concatenate([[p.keypoints for p in pp] for pp in people])  # [N, K, 3]
    np.testing.assert_allclose(got[..., :2], kpts, atol=1e-4)
    np.testing.assert_allclose(got[..., 2], scores, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_matches_eager():
    model = tiny_pose_model()
    img = np.random.default_rng(5).integers(0, 255, (100, 80, 3), dtype=np.uint8)
    boxes = [[5, 5, 60, 90], [20, 10, 50, 50]]
    eager = PoseEstimator(model, device="cpu")(img, boxes)
    est = PoseEstimator(tiny_pose_model(), device="cpu", compile=True)
    compiled = est(img, boxes)
    x = torch.randn(2, 3, *INPUT, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, got = model.predict(x, flip_test=False), est.model.predict(x, flip_test=False)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()  # the compiled graph computes the same heatmaps
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(a.keypoints[:, 2], b.keypoints[:, 2], atol=1e-4)
        # DARK amplifies last-bit differences on this random model's flat maps: most points agree closely
        assert np.median(np.abs(a.keypoints[:, :2] - b.keypoints[:, :2])) < 0.01


def test_person_results():
    k = get_scheme("coco17").num_keypoints
    kp = np.zeros((k, 3), np.float32)
    kp[:, 0], kp[:, 1] = np.arange(k), 2 * np.arange(k)
    kp[:5, 2], kp[5:, 2] = 0.9, 0.1  # 5 points above mmpose's rescoring threshold 0.2
    p = Person(kp, np.array([1.0, 2.0, 30.0, 40.0]), 0.5, get_scheme("coco17").names)
    assert p.score == pytest.approx(0.5 * 0.9)
    coco = p.to_coco(7)
    assert coco["image_id"] == 7 and coco["category_id"] == 1 and coco["bbox"] == [1.0, 2.0, 30.0, 40.0]
    assert len(coco["keypoints"]) == 3 * k and coco["keypoints"][3:6] == [1.0, 2.0, 0.9]
    assert p.to_dict()["left_eye"] == pytest.approx((1.0, 2.0, 0.9))


def test_from_pretrained_reads_foreign_checkpoints(tmp_path):
    """Anything load_model reads: here a transformers VitPose folder, converted on the fly."""
    from tests.sapiens_lite.test_convert_equivalence import _vitpose

    ref = _vitpose(simple=False)
    ref.save_pretrained(tmp_path / "hf")
    est = PoseEstimator.from_pretrained(tmp_path / "hf", device="cpu")
    assert (
        est.input_size == (64, 48) and est.scheme.name == "coco17" and est.model.config.head.kind == "vitpose"
    )
    (person,) = est(np.zeros((64, 48, 3), np.uint8))
    assert person.keypoints.shape == (17, 3) and len(person.names) == 17
