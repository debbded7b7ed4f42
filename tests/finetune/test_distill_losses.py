"""Distillation losses: zero for a student equal to its teacher, the KL against torch's kl_div, the UDP
resampling of heatmaps against heatmaps encoded on the student's grid, DWPose's decay, and gradients
that reach the student and the projections only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.distill import DistillStudent, TeacherNet, teacher_targets
from finetune.distill_losses import (
    distill_scale,
    feature_distill_loss,
    heatmap_distill_loss,
    resample_heatmaps,
    token_distill_loss,
)
from sapiens_lite.codec import decode_heatmaps, encode_heatmaps
from sapiens_lite.models.pose import HeadConfig, build_pose_model


def test_losses_are_zero_when_the_student_is_the_teacher():
    torch.manual_seed(0)
    heatmaps = torch.rand(2, 17, 16, 12)
    assert heatmap_distill_loss(heatmaps, heatmaps.clone(), "mse") == 0
    assert heatmap_distill_loss(heatmaps, heatmaps.clone(), "kl", temperature=0.3).abs() < 1e-6
    maps = [torch.randn(2, 64, 4, 3), torch.randn(2, 64, 4, 3)]
    assert feature_distill_loss(maps, [m.clone() for m in maps]) == 0
    tokens = torch.randn(2, 12, 64) * 5 + 3
    assert token_distill_loss(tokens, tokens.clone(), "cosine").abs() < 1e-6
    assert token_distill_loss(tokens, tokens.clone(), "smooth_l1") == 0
    # And not zero otherwise.
    assert heatmap_distill_loss(heatmaps, heatmaps.flip(-1), "kl") > 0
    assert token_distill_loss(tokens, tokens.flip(1), "cosine") > 0

    # A whole pose model distilled into a copy of itself (identity projections): every term is zero.
    teacher = build_pose_model("vit_test", "coco17", input_size=(64, 48)).eval()
    student = build_pose_model("vit_test", "coco17", input_size=(64, 48)).eval()
    student.load_state_dict(teacher.state_dict())
    layers = (0, 1)
    wrapped = DistillStudent(student, layers, True, torch.nn.ModuleList([torch.nn.Identity()] * 2), (4, 3))
    x = torch.randn(2, 3, 64, 48)
    t_raw, t_feats, _ = TeacherNet(teacher, layers)(x)
    t_heatmaps, t_features = teacher_targets(t_raw, t_feats, (16, 12), torch.float32)
    s_heatmaps, projected = wrapped(x)
    assert heatmap_distill_loss(s_heatmaps, t_heatmaps, "mse") == 0
    assert feature_distill_loss(projected, t_features.unbind(1)) == 0


def test_kl_matches_torch_kl_div_on_spatial_softmax():
    torch.manual_seed(1)
    s, t = torch.randn(3, 5, 8, 6), torch.randn(3, 5, 8, 6)
    tau = 0.7
    ref = F.kl_div(
        F.log_softmax(s.flatten(2) / tau, dim=-1).reshape(15, -1),
        F.softmax(t.flatten(2) / tau, dim=-1).reshape(15, -1),
        reduction="batchmean",
    )  # sum over pixels, mean over the B * K heatmaps
    torch.testing.assert_close(heatmap_distill_loss(s, t, "kl", tau), ref)
    torch.testing.assert_close(heatmap_distill_loss(s, t, "mse"), F.mse_loss(s, t))


def test_resampled_teacher_heatmaps_peak_where_the_student_grid_puts_the_keypoint():
    """Heatmaps of a 4x larger crop of the same box, resampled to the student's grid, decode (argmax + DARK)
    to the keypoints themselves: the UDP grids share their first and last pixel centres. Resampling with
    half-pixel centres (align_corners=False) would be off by up to a pixel; keypoints are kept away from
    the border, where DARK's 11x11 blur is unreliable on a 16x12 heatmap."""
    kpts = torch.tensor(
        [[[20.2, 31.7], [12.6, 40.3], [30.0, 10.4], [35.5, 50.75]]]
    )  # [1, 4, 2] in a 64x48 crop
    vis = torch.ones(1, 4)
    # The same points in the 256x192 crop of the same box: UDP maps pixel 0 and W - 1 to the box's edges.
    big, _ = encode_heatmaps(kpts * torch.tensor([191 / 47, 255 / 63]), vis, (256, 192), (64, 48), sigma=4.0)
    small = resample_heatmaps(big, (16, 12))
    assert small.shape == (1, 4, 16, 12)
    found, _ = decode_heatmaps(small, input_size=(64, 48))
    torch.testing.assert_close(found, kpts, atol=0.05, rtol=0)
    naive = F.interpolate(big, size=(16, 12), mode="bilinear", align_corners=False)
    assert (decode_heatmaps(naive, input_size=(64, 48))[0] - kpts).abs().max() > 0.5


def test_dwpose_decay_goes_linearly_to_zero():
    assert [distill_scale(s, 4, True) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert distill_scale(3, 4, False) == 1.0


def test_targets_are_rounded_to_the_storage_dtype():
    hm = torch.rand(2, 17, 32, 24) + 1e-4 * torch.rand(2, 17, 32, 24)
    t16, _ = teacher_targets(hm, [], (16, 12), torch.float16)
    assert t16.dtype == torch.float32 and torch.equal(t16, t16.half().float())
    t32, feats = teacher_targets(hm, [torch.randn(2, 8, 2, 2)] * 3, (16, 12), torch.float32)
    assert not torch.equal(t16, t32) and feats.shape == (2, 3, 8, 2, 2)


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_reach_only_the_student_and_the_projections(stage):
    torch.manual_seed(2)
    teacher = build_pose_model("vit_test", "coco17", input_size=(128, 96), head=HeadConfig("vitpose", 32))
    teacher.eval().requires_grad_(False)
    student = build_pose_model("vit_test", "coco17", input_size=(64, 48), head=HeadConfig("simple"))
    if stage == 1:
        projections = torch.nn.ModuleList(torch.nn.Conv2d(64, 64, 1) for _ in range(2))
        wrapped = DistillStudent(student, (0, -1 % 2), True, projections, (8, 6))
        t_net = TeacherNet(teacher, (1, 1))
    else:  # stage 2: the student is a copy of the teacher; its frozen backbone never runs
        student = build_pose_model("vit_test", "coco17", input_size=(128, 96), head=HeadConfig("vitpose", 32))
        student.load_state_dict(teacher.state_dict())
        student.backbone.requires_grad_(False)
        wrapped = DistillStudent(student)
        t_net = TeacherNet(teacher)
    x_t = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        t_raw, t_feats, t_map = t_net(x_t)
    hm_size = (16, 12) if stage == 1 else (32, 24)
    t_heatmaps, t_features = teacher_targets(t_raw, t_feats, hm_size, torch.float16)
    if stage == 1:
        heatmaps, projected = wrapped(torch.randn(2, 3, 64, 48))
        loss = heatmap_distill_loss(heatmaps, t_heatmaps) + feature_distill_loss(
            projected, t_features.unbind(1)
        )
    else:
        heatmaps, _ = wrapped(features=t_map)
        loss = heatmap_distill_loss(heatmaps, t_heatmaps, "kl", 0.5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    trained = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trained), [
        n for n, p in trained if p.grad is None
    ]
    if stage == 1:
        assert any(n.startswith("projections.") for n, _ in trained)
        assert any(n.startswith("student.backbone.") for n, _ in trained)
    else:
        assert {n.split(".")[1] for n, _ in trained} == {"head"}
