"""Precise BatchNorm statistics (`train.precise_bn`): after recalibration the running statistics are the stored
batches' own statistics, so eval mode normalises as train mode did on them; a frozen tower is left alone."""

import torch
import torch.nn as nn

from med3dvlm.train.precise_bn import RecentVolumes


def tower():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.GELU())


def test_recalibrated_statistics_are_those_of_the_stored_batches():
    net = tower()
    recent = RecentVolumes(2)
    batches = [torch.randint(0, 256, (3, 4, 6, 6), dtype=torch.uint8) for _ in range(3)]
    for b in batches:
        recent.add(b)  # only the last 2 are kept
    assert recent.recalibrate(net, torch.device("cpu"))
    x = torch.cat(batches[1:]).float().div(255).unsqueeze(1)
    with torch.no_grad():
        feats = net[0](x)
    # update_bn averages per-batch statistics cumulatively; the two batches have equal size
    assert torch.allclose(net[1].running_mean, feats.mean(dim=(0, 2, 3, 4)), atol=1e-5)
    per_batch_var = torch.stack([f.var(dim=(0, 2, 3, 4), unbiased=True) for f in feats.split(3)])
    assert torch.allclose(net[1].running_var, per_batch_var.mean(0), atol=1e-5)
    assert net.training  # its mode is restored


def test_eval_mode_matches_train_mode_on_the_stored_batch_after_recalibration():
    net = tower()
    with torch.no_grad():
        net[0].weight.mul_(40)  # weights far from those the default statistics (0, 1) describe
    b = torch.randint(0, 256, (8, 4, 6, 6), dtype=torch.uint8)
    x = b.float().div(255).unsqueeze(1)
    with torch.no_grad():
        train_out = net.train()(x)
        stale = net.eval()(x)
        recent = RecentVolumes(1)
        recent.add(b)
        recent.recalibrate(net, torch.device("cpu"))
        fresh = net.eval()(x)
    assert (stale - train_out).abs().max() > 0.1
    assert (fresh - train_out).abs().max() < 0.05  # running var is unbiased, batch var biased: close, not equal


def test_a_frozen_tower_or_an_empty_buffer_is_left_alone():
    net = tower()
    before = net[1].running_mean.clone()
    assert not RecentVolumes(4).recalibrate(net, torch.device("cpu"))  # nothing stored
    net.requires_grad_(False)
    recent = RecentVolumes(4)
    recent.add(torch.randint(0, 256, (2, 4, 6, 6), dtype=torch.uint8))
    assert not recent.recalibrate(net, torch.device("cpu"))
    assert torch.equal(net[1].running_mean, before)
    off = RecentVolumes(0)
    off.add(torch.zeros(2, 4, 6, 6, dtype=torch.uint8))
    assert not off.batches
