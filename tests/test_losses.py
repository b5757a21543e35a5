"""The maths of the losses, pinned against reference formulas on hand-made tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from edgekd.losses.terms import at_loss, attention_map, hint_loss, kd_loss, match_spatial, self_attention_map
from edgekd.models import build_model, pair_stages, stage_shapes, tap_candidates


def test_attention_map_equals_reference_formula():
    f = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[2.0, 0.0], [1.0, -1.0]]]])  # 1 x 2 x 2 x 2
    # mean over channels of f^2: [(1+4)/2, (4+0)/2, (0+1)/2, (9+1)/2] = [2.5, 2, 0.5, 5]
    raw = torch.tensor([2.5, 2.0, 0.5, 5.0])
    expected = raw / math.sqrt((raw**2).sum().item())
    assert torch.allclose(attention_map(f)[0], expected)
    assert torch.allclose(attention_map(f).norm(dim=1), torch.ones(1))


def test_attention_map_p_is_the_exponent():
    f = torch.rand(3, 4, 5, 5) + 0.1
    expected = F.normalize(f.pow(4).mean(1).flatten(1), dim=1)
    assert torch.allclose(attention_map(f, p=4), expected)


def test_kd_is_zero_for_identical_logits_and_matches_kl_div():
    z = torch.randn(8, 10)
    assert kd_loss(z, z.clone(), 4.0).abs().item() < 1e-6
    zs, zt, t = torch.randn(8, 10), torch.randn(8, 10), 3.0
    ref = F.kl_div(F.log_softmax(zs / t, 1), F.softmax(zt / t, 1), reduction="batchmean") * t * t
    assert torch.allclose(kd_loss(zs, zt, t), ref, atol=1e-6)
    assert kd_loss(zs, zt, t) > 0


def test_kd_gradient_reaches_only_the_student():
    zs, zt = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    kd_loss(zs, zt, 2.0).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0 and zt.grad is None


def test_at_loss_zero_for_same_maps_and_pools_the_larger_map():
    ft = torch.rand(2, 8, 8, 8)
    assert at_loss([ft], [ft * 3.0]).item() < 1e-10  # scale does not change a normalised map
    fs = torch.rand(2, 4, 4, 4)
    pooled, same = match_spatial(ft, fs)
    assert pooled.shape[-2:] == (4, 4) and same is fs
    ref = F.mse_loss(attention_map(fs), attention_map(F.avg_pool2d(ft, 2)))
    assert torch.allclose(at_loss([ft], [fs]), ref)


def test_self_attention_map_of_constant_features_is_uniform():
    f = torch.ones(2, 3, 4, 4)
    a = self_attention_map(f)
    assert a.shape == (2, 16)
    assert torch.allclose(a, torch.full_like(a, 1 / 4))  # uniform and unit norm: 16 * (1/4)^2 = 1
    g = torch.randn(2, 3, 4, 4)
    assert torch.allclose(self_attention_map(g).norm(dim=1), torch.ones(2))
    assert at_loss([g], [g], map_fn="self").item() < 1e-12


def test_hint_loss_is_mse_after_pooling():
    ft, fs = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 8, 8)
    assert torch.allclose(hint_loss([ft], [fs]), F.mse_loss(F.avg_pool2d(fs, 2), ft))


@pytest.mark.parametrize("size", [16, 28, 32])
def test_stage_pairs_match_spatial_sizes(size):
    t = build_model("resnet18", 10, 1, size, width=8)
    s = build_model("mobilenet_v2", 10, 1, size, width_mult=0.25)
    pairs = pair_stages(stage_shapes(t, tap_candidates("resnet18", t), 1, size),
                        stage_shapes(s, tap_candidates("mobilenet_v2", s), 1, size))
    assert [p.teacher for p in pairs] == ["layer1", "layer2", "layer3", "layer4"]
    for p in pairs:
        assert p.teacher_shape[1:] == p.student_shape[1:]
    assert len({p.student for p in pairs}) == 4  # a distinct student stage per teacher stage


def test_resnet50_and_large_inputs_keep_torchvision_layout():
    t = build_model("resnet50", 10, 3, 96)
    assert t.conv1.stride == (2, 2) and not isinstance(t.maxpool, torch.nn.Identity)
    shapes = stage_shapes(t, tap_candidates("resnet50", t), 3, 96)
    assert shapes["layer1"] == (256, 24, 24) and shapes["layer4"] == (2048, 3, 3)


def test_warmup_scale_ramps_linearly_then_holds():
    from edgekd.losses.terms import warmup_scale

    assert [warmup_scale(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_scale(0, 0) == 1.0  # no warm-up: full weight from the first step


def test_epochs_since_best_reads_the_first_best_epoch():
    from edgekd.distill.fit import epochs_since_best

    h = [{"val_top1": v} for v in (50.0, 60.0, 60.0, 55.0)]
    assert epochs_since_best(h) == 2  # 60 first reached at epoch 2; a tie is no improvement
    assert epochs_since_best(h[:2]) == 0
    assert epochs_since_best([{"val_top1": float("nan")}]) == 0
