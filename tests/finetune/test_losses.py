"""Heatmap losses against loop-based restatements of mmpose's KeypointMSELoss / KeypointOHKMMSELoss."""

import pytest
import torch

from finetune.losses import KeypointMSELoss, KeypointOHKMMSELoss, LossConfig, build_loss


def _data(b=3, k=10, h=8, w=6):
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(b, k, h, w, generator=g)
    target = torch.rand(b, k, h, w, generator=g)
    weight = (torch.rand(b, k, generator=g) > 0.3).float()
    return pred, target, weight


def test_mse_weights_pixels_and_averages_over_all_of_them():
    pred, target, weight = _data()
    loss = build_loss(LossConfig(kind="mse"))(pred, target, weight)
    b, k, h, w = pred.shape
    total = sum(weight[i, j] * ((pred[i, j] - target[i, j]) ** 2).sum() for i in range(b) for j in range(k))
    torch.testing.assert_close(loss, total / (b * k * h * w))
    # Zero-weight keypoints contribute nothing, whatever their prediction.
    pred2 = pred.clone()
    pred2[weight == 0] = 100.0
    torch.testing.assert_close(KeypointMSELoss()(pred2, target, weight), loss)
    assert KeypointMSELoss(loss_weight=2.0)(pred, target, weight) == pytest.approx(2 * loss.item(), rel=1e-6)


def test_ohkm_keeps_the_hardest_keypoints_per_sample():
    pred, target, weight = _data()
    topk = 4
    loss = build_loss(LossConfig(kind="ohkm_mse", topk=topk))(pred, target, weight)
    per_sample = []
    for i in range(pred.shape[0]):
        losses = torch.stack(
            [
                ((pred[i, j] * weight[i, j] - target[i, j] * weight[i, j]) ** 2).mean()
                for j in range(pred.shape[1])
            ]
        )
        per_sample.append(losses.sort(descending=True).values[:topk].mean())
    torch.testing.assert_close(loss, torch.stack(per_sample).mean())
    # With topk = K it is the unweighted mean of per-keypoint losses (weight^2 inside).
    full = KeypointOHKMMSELoss(topk=pred.shape[1])(pred, target, weight)
    w = weight[:, :, None, None]
    torch.testing.assert_close(full, ((pred * w - target * w) ** 2).mean())
    assert loss > full  # hardest ones only


def test_loss_config_errors():
    with pytest.raises(ValueError, match="topk"):
        LossConfig(topk=0)
    with pytest.raises(ValueError, match="kind"):
        LossConfig(kind="l1")
    pred, target, weight = _data(k=3)
    with pytest.raises(ValueError, match="topk=8 is larger than the number of keypoints 3"):
        build_loss(LossConfig(kind="ohkm_mse"))(pred, target, weight)


def test_gradients_flow_only_through_weighted_keypoints():
    pred, target, weight = _data()
    pred.requires_grad_(True)
    build_loss(LossConfig(kind="mse"))(pred, target, weight).backward()
    assert torch.all(pred.grad[weight == 0] == 0)
    assert torch.all(pred.grad[weight == 1].abs().sum(dim=(1, 2)) > 0)
