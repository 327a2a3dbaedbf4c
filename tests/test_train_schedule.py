"""Learning-rate and momentum schedules, and the resumable sampler."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pacofr.train.sampling import ResumableSampler
from pacofr.train.schedule import LRSchedule, cosine_ramp, scaled_lr, warmup_cosine


def test_linear_scaling_rule() -> None:
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(1.5e-4, 256) == 1.5e-4
    with pytest.raises(ValueError, match="effective_batch"):
        scaled_lr(1e-4, 0)


def test_warmup_then_cosine_values() -> None:
    peak, final, total, warm = 1.0, 0.1, 110, 10
    values = [warmup_cosine(s, total, warm, peak, final) for s in range(total + 5)]
    assert values[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warm-up to the peak
    assert values[10] == pytest.approx(peak)  # cosine starts at the peak
    assert values[60] == pytest.approx(final + (peak - final) * 0.5)  # half way: the mean
    assert values[35] == pytest.approx(final + (peak - final) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert values[110:] == pytest.approx([final] * 5)  # past the end: the floor
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay
    assert warmup_cosine(0, 5, 0, 2.0) == 2.0 and warmup_cosine(4, 5, 5, 2.0) == 2.0
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, 10, 11, 1.0)


def test_schedule_sets_group_lrs_with_scales() -> None:
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": [params[0]]}, {"params": [params[1]], "lr_scale": 0.5}], lr=1.0)
    schedule = LRSchedule(peak_lr=0.4, total_steps=20, warmup_steps=4)
    assert schedule.apply(opt, 1) == pytest.approx(0.2)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.2, 0.1])


def test_teacher_momentum_ramp() -> None:
    assert cosine_ramp(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_ramp(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_ramp(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert cosine_ramp(150, 100, 0.996, 1.0) == pytest.approx(1.0)


def test_sampler_resumes_inside_an_epoch_and_shards_by_rank() -> None:
    data = list(range(10))
    full = ResumableSampler(data, seed=3)
    full.set_position(epoch=2)
    order = list(full)
    assert sorted(order) == data and order != data  # a permutation, fixed by (seed, epoch)
    resumed = ResumableSampler(data, seed=3)
    resumed.set_position(epoch=2, start=4)
    assert list(resumed) == order[4:] and len(resumed) == 6
    other_epoch = ResumableSampler(data, seed=3)
    other_epoch.set_position(epoch=3)
    assert list(other_epoch) != order
    shards = []
    for rank in range(2):
        sampler = ResumableSampler(data, num_replicas=2, rank=rank, seed=3)
        sampler.set_position(epoch=2)
        shards.append(list(sampler))
    assert sorted(shards[0] + shards[1]) == data
    with pytest.raises(ValueError, match="start must be in"):
        full.set_position(0, start=11)


def test_a_run_that_is_all_warm_up_is_warned_about(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="pacofr.train.schedule"):
        LRSchedule(peak_lr=1e-3, total_steps=100, warmup_steps=99)
    assert not caplog.records  # one decaying step: nothing to say
    with caplog.at_level(logging.WARNING, logger="pacofr.train.schedule"):
        schedule = LRSchedule(peak_lr=1e-3, total_steps=100, warmup_steps=100)
    assert "never decays" in caplog.text and "train.warmup_epochs" in caplog.text
    assert schedule.lr_at(99) == 1e-3  # what the warning says: the last step is at the peak
