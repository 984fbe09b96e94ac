"""Fast tests of segray/train.py without Ray: augmentation, class weights, LR schedule, losses,
config checks and the checks that fail before any worker starts."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from segray import modelio, runrecord, train, worker
from segray.camvid import NUM_CLASSES, VOID_INDEX
from segray.dataset import DatasetError
from segray.recipe import (
    MAX_CLASS_WEIGHT,
    Augmentation,
    augment,
    augment_batch,
    class_mix,
    class_weights,
    color_jitter,
    extend_schedule,
    fresh_schedule,
    lr_factor,
    lr_factor_at,
    make_scheduler,
    median_frequency_weights,
    schedule_progress,
    weighted_loss_sum,
)
from segray.runrecord import legacy_recipe, resume_refusal
from segray.train import TrainConfig, TrainError, _check_dataset


def _batch(n=4, h=12, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, h, w, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n, h, w), generator=g)
    labels[:, :2, :3] = VOID_INDEX
    return images, labels


# ---------------------------------------------------------------------------- augmentation


def test_augment_keeps_shapes_dtypes_and_label_values():
    images, labels = _batch()
    for seed in range(5):
        out_i, out_l = augment(images, labels, torch.Generator().manual_seed(seed))
        assert out_i.shape == images.shape and out_i.dtype == images.dtype
        assert out_l.shape == labels.shape and out_l.dtype == labels.dtype
        # Nearest-neighbour resampling: no new class values, only void where padded.
        assert set(out_l.unique().tolist()) <= set(labels.unique().tolist()) | {VOID_INDEX}


def test_augment_identity_without_scale_and_flip():
    images, labels = _batch()
    out_i, out_l = augment(images, labels, torch.Generator().manual_seed(0), scale_range=(1.0, 1.0), flip_prob=0.0, jitter=0.0)
    assert torch.equal(out_l, labels)
    torch.testing.assert_close(out_i, images, atol=1e-5, rtol=0)


def test_augment_flip_only_mirrors_image_and_label():
    images, labels = _batch()
    out_i, out_l = augment(images, labels, torch.Generator().manual_seed(0), scale_range=(1.0, 1.0), flip_prob=1.0, jitter=0.0)
    assert torch.equal(out_l, labels.flip(-1))
    torch.testing.assert_close(out_i, images.flip(-1), atol=1e-5, rtol=0)


def test_augment_zoom_out_pads_with_void_and_zero():
    images, labels = _batch(n=2)
    labels[labels == VOID_INDEX] = 0  # no void in the input: any void out is padding
    out_i, out_l = augment(images, labels, torch.Generator().manual_seed(0), scale_range=(0.5, 0.5), flip_prob=0.0, jitter=0.0)
    pad = out_l == VOID_INDEX
    # Half size in each direction: three quarters of the frame is padding (up to rounding at edges).
    assert 0.6 < pad.float().mean().item() < 0.85
    # Padding is 0, the mean colour of a normalised image (bilinear blends it in at the border).
    padded = out_i.permute(0, 2, 3, 1)[pad]
    assert (padded == 0).all(dim=1).float().mean() > 0.8


def test_augment_zoom_in_crops_without_padding():
    images, labels = _batch(n=3)
    labels[labels == VOID_INDEX] = 0
    _, out_l = augment(images, labels, torch.Generator().manual_seed(1), scale_range=(1.5, 1.5), flip_prob=0.5)
    assert not (out_l == VOID_INDEX).any()


def test_color_jitter_changes_colours_not_labels_and_stays_in_range():
    images, labels = _batch()
    out_i, out_l = augment(images, labels, torch.Generator().manual_seed(3), scale_range=(1.0, 1.0), flip_prob=0.0)
    assert torch.equal(out_l, labels)
    assert (out_i - images).abs().mean() > 1e-3  # colours moved
    m = torch.tensor(modelio.DEFAULT_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(modelio.DEFAULT_STD).view(1, 3, 1, 1)
    rgb = out_i * s + m
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5


def test_color_jitter_strength_zero_is_identity_and_strength_moves_colours():
    pixels = torch.rand(2, 3, 12, 20, generator=torch.Generator().manual_seed(0))  # real pixels: nothing to clip
    images = (pixels - torch.tensor(modelio.DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(modelio.DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(color_jitter(images, torch.Generator().manual_seed(0), 0.0), images, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(1)
    out = color_jitter(images, g, 0.5)
    assert out.shape == images.shape and not torch.allclose(out, images)


def test_augment_crop_is_a_window_at_the_same_scale():
    images, labels = _batch(n=3, h=16, w=32)
    out_i, out_l = augment(
        images, labels, torch.Generator().manual_seed(0), scale_range=(1.0, 1.0), flip_prob=0.0, jitter=0.0, crop=(8, 16)
    )
    assert out_i.shape == (3, 3, 8, 16) and out_l.shape == (3, 8, 16)
    for k in range(3):
        # Nearest neighbour at scale 1: the label window is a block of the input label.
        assert any(
            torch.equal(out_l[k], labels[k, dy : dy + 8, dx : dx + 16]) for dy in range(9) for dx in range(17)
        ), f"image {k}: the crop is not a window of the label"
    # Same pixel scale: a ramp of slope 1 per pixel keeps slope 1 inside the window.
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(32.0), indexing="ij")
    ramp = torch.stack([xs, ys, xs + ys]).expand(2, 3, 16, 32).contiguous()
    out, _ = augment(ramp, labels[:2], torch.Generator().manual_seed(1), scale_range=(1.0, 1.0), flip_prob=0.0,
                     jitter=0.0, crop=(8, 16))
    torch.testing.assert_close(out[:, 0, :, 1:] - out[:, 0, :, :-1], torch.ones(2, 8, 15), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, 1, 1:, :] - out[:, 1, :-1, :], torch.ones(2, 7, 16), atol=1e-4, rtol=0)


def test_crop_flag_is_checked():
    with pytest.raises(TrainError, match="--crop must be HxW"):
        TrainConfig(data="d", storage="s", name="n", augmentation=train.check_augmentation(crop=(8, 240)))
    with pytest.raises(TrainError, match="--no-augment"):
        TrainConfig(data="d", storage="s", name="n",
                    augmentation=train.check_augmentation(crop=(128, 176), enabled=False))


def test_augment_is_reproducible_from_the_generator():
    images, labels = _batch()
    a = augment(images, labels, torch.Generator().manual_seed(7))
    b = augment(images, labels, torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_classmix_pastes_half_of_the_partners_classes_image_and_label_alike():
    images, labels = _batch(n=4, h=12, w=20)
    labels[3, 5:, :] = VOID_INDEX  # the partner of image 0 has a large void area
    before = (images.clone(), labels.clone())
    out_i, out_l = class_mix(images, labels, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(images, before[0]) and torch.equal(labels, before[1]), "the inputs were modified"
    assert out_i.shape == images.shape and out_l.dtype == labels.dtype
    for i in range(4):
        j = (i - 1) % 4
        pasted = (out_i[i] == images[j]).all(0)
        kept = (out_i[i] == images[i]).all(0)
        assert bool((pasted | kept).all()) and not bool((pasted & kept).any())
        assert torch.equal(out_l[i][pasted], labels[j][pasted]) and torch.equal(out_l[i][kept], labels[i][kept])
        present = set(labels[j].unique().tolist()) - {VOID_INDEX}
        chosen = set(labels[j][pasted].unique().tolist())
        assert VOID_INDEX not in chosen and chosen <= present
        assert len(chosen) == (len(present) + 1) // 2
        # A chosen class is pasted whole: every pixel of it in the partner.
        assert torch.equal(pasted, torch.isin(labels[j], torch.tensor(sorted(chosen))))


def test_classmix_probability_and_its_settings():
    images, labels = _batch()
    out = class_mix(images, labels, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(out[0], images) and torch.equal(out[1], labels)
    one = class_mix(images[:1], labels[:1], torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(one[0], images[:1]) and torch.equal(one[1], labels[:1])
    # Off (the default), a run's augmentation draws exactly what it drew before the setting existed.
    a = augment_batch(images, labels, torch.Generator().manual_seed(3), Augmentation())
    b = augment(images, labels, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    mixed = augment_batch(images, labels, torch.Generator().manual_seed(3), Augmentation(classmix=1.0))
    assert not torch.equal(mixed[1], b[1])
    with pytest.raises(TrainError, match="--classmix must be between 0 and 1"):
        train.check_augmentation(classmix=1.5)
    with pytest.raises(TrainError, match="--no-augment"):
        train.check_augmentation(classmix=0.5, enabled=False)


# --------------------------------------------------------------------------- class weights


def test_median_frequency_weights_by_hand():
    # freq = 0.1, 0.2, 0.3, 0.4 -> median 0.25 -> weights 2.5, 1.25, 0.8333, 0.625
    w = median_frequency_weights([10, 20, 30, 40])
    np.testing.assert_allclose(w, [2.5, 1.25, 0.25 / 0.3, 0.625], rtol=1e-6)
    assert w.dtype == np.float32


def test_median_frequency_weights_zero_count_classes():
    # Absent classes get the neutral weight 1 and are left out of the median: 0.5, 0.5 -> median 0.5.
    w = median_frequency_weights([0, 50, 0, 50])
    np.testing.assert_allclose(w, [1.0, 1.0, 1.0, 1.0])
    w = median_frequency_weights([0, 10, 30, 60])  # median freq of (0.1, 0.3, 0.6) = 0.3
    np.testing.assert_allclose(w, [1.0, 3.0, 1.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(median_frequency_weights([0, 0, 0]), [1.0, 1.0, 1.0])


def test_median_frequency_weights_are_capped():
    w = median_frequency_weights([1, 10**6, 10**6])
    assert w[0] == MAX_CLASS_WEIGHT and w[1] == pytest.approx(1.0)


def test_median_frequency_weights_reject_bad_counts():
    with pytest.raises(ValueError, match="non-negative"):
        median_frequency_weights([1, -2, 3])


def test_class_weights_none_and_unknown():
    assert class_weights("none", [1, 2, 3]) is None
    assert class_weights("median_freq", [1, 1]).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="median_freq, sqrt_median_freq, none"):
        class_weights("inverse", [1, 2])


def test_sqrt_median_frequency_weights_by_hand():
    # median-frequency 2.5, 1.25, 0.8333, 0.625 -> square roots; the cap applies before the root.
    w = class_weights("sqrt_median_freq", [10, 20, 30, 40])
    np.testing.assert_allclose(w, np.sqrt([2.5, 1.25, 0.25 / 0.3, 0.625]), rtol=1e-6)
    assert w.dtype == np.float32
    assert class_weights("sqrt_median_freq", [1, 10**6, 10**6])[0] == pytest.approx(MAX_CLASS_WEIGHT ** 0.5)


def test_class_weights_on_camvid_counts_look_like_segnet():
    # Train-split pixel counts of CamVid at 176x240: road and sky get < 1, bicyclist ~15.
    counts = [2610681, 3607838, 152576, 4909664, 695157, 1507569, 181752, 174674, 907014, 98286, 45044]
    w = median_frequency_weights(counts)
    assert w[3] < 0.2 and w[0] < 0.3 and 10 < w[10] < 20


# ------------------------------------------------------------------------ losses, schedule


def test_weighted_loss_sum_matches_torch_mean_and_handles_all_void():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, NUM_CLASSES, 5, 6, generator=g)
    labels = torch.randint(0, NUM_CLASSES + 1, (2, 5, 6), generator=g)  # includes void
    weight = torch.rand(NUM_CLASSES, generator=g) + 0.5
    s, d = weighted_loss_sum(logits, labels, weight)
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=weight, ignore_index=VOID_INDEX)
    torch.testing.assert_close(s / d, expected)
    s, d = weighted_loss_sum(logits, torch.full_like(labels, VOID_INDEX), weight)
    assert s.item() == 0 and d.item() == 0  # summed across workers first; no NaN from 0/0 here


def test_lr_factor_schedules():
    assert [lr_factor("constant", p) for p in (0, 0.5, 1)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 0) == 1.0 and lr_factor("cosine", 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 1) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("onecycle", 0) == pytest.approx(1 / 25)
    assert lr_factor("onecycle", 0.3) == pytest.approx(1.0)
    assert lr_factor("onecycle", 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor("cosine", 1.7) == lr_factor("cosine", 1.0)  # clamped: extra steps do not restart it
    with pytest.raises(ValueError, match="constant, cosine, onecycle"):
        lr_factor("step", 0.1)


# ------------------------------------------------------- the LR schedule across an --epochs change


def _step_factors(schedule, knots, first_epoch, last_epoch, steps_per_epoch):
    """The LR factor of every step of epochs first_epoch+1..last_epoch (what the worker's scheduler uses)."""
    return [lr_factor_at(schedule, knots, e + k / steps_per_epoch)
            for e in range(first_epoch, last_epoch) for k in range(steps_per_epoch)]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
@pytest.mark.parametrize("e0, done, e1, spe0, spe1", [
    (10, 6, 16, 7, 7),  # a longer run, after the warm-up
    (10, 2, 13, 7, 7),  # onecycle: inside its warm-up
    (10, 6, 25, 5, 9),  # and resumed with other --num-workers (other steps per epoch)
    (10, 6, 8, 7, 7),  # a shorter one, not yet reached
])
def test_lr_schedule_extension_is_continuous_and_ends_at_the_final_value(schedule, e0, done, e1, spe0, spe1):
    knots = fresh_schedule(e0)
    before = _step_factors(schedule, knots, 0, done, spe0)
    extended = extend_schedule(knots, done, e1)
    after = _step_factors(schedule, extended, done, e1, spe1)
    # The first new step has the LR the run would have had there (the original run's next step).
    assert after[0] == pytest.approx(lr_factor_at(schedule, knots, done), abs=1e-12)
    # No jump at the boundary larger than one step's normal change (of either side).
    normal = max([abs(b - a) for a, b in zip(before, before[1:])] + [abs(b - a) for a, b in zip(after, after[1:])])
    assert abs(after[0] - before[-1]) <= normal + 1e-12
    # The steps so far are unchanged, and the run ends at the schedule's final value at e1.
    assert _step_factors(schedule, extended, 0, done, spe0) == pytest.approx(before, abs=1e-12)
    assert lr_factor_at(schedule, extended, e1) == pytest.approx(lr_factor(schedule, 1.0), abs=1e-12)
    assert after[-1] == pytest.approx(lr_factor_at(schedule, extended, e1 - 1 / spe1), abs=1e-12)
    if e1 > e0:  # stretched: the rest never changes faster than before
        assert max(abs(b - a) for a, b in zip(after, after[1:])) <= normal + 1e-12


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_the_old_step_count_definition_jumps(schedule):
    """The control: progress = step / (new epochs x steps) (before the knots) jumps at the boundary."""
    spe, done, e1 = 7, 6, 16
    old_last = lr_factor(schedule, (done * spe - 1) / (10 * spe))
    restarted_first = lr_factor(schedule, done * spe / (e1 * spe))
    assert abs(restarted_first - old_last) > 0.1
    extended_first = lr_factor_at(schedule, extend_schedule(fresh_schedule(10), done, e1), done)
    assert abs(extended_first - old_last) < 0.05


def test_extend_schedule_knots_by_hand():
    assert fresh_schedule(4) == [[0.0, 0.0], [4.0, 1.0]]
    assert extend_schedule(fresh_schedule(4), 2, 6) == [[0.0, 0.0], [2.0, 0.5], [6.0, 1.0]]
    assert extend_schedule(fresh_schedule(4), 2, 4) == fresh_schedule(4)  # the same length: unchanged
    assert extend_schedule(fresh_schedule(4), 0, 9) == fresh_schedule(9)  # nothing trained yet: afresh
    assert extend_schedule(fresh_schedule(4), 5, 5) == fresh_schedule(4)  # nothing left to train
    # Extended twice: the first extension's knots are kept up to the second boundary.
    twice = extend_schedule(extend_schedule(fresh_schedule(4), 2, 6), 4, 12)
    assert twice == [[0.0, 0.0], [2.0, 0.5], [4.0, 0.75], [12.0, 1.0]]
    # A schedule that had ended stays at its end (a finished cosine run keeps LR 0).
    assert extend_schedule(fresh_schedule(4), 4, 8) == [[0.0, 0.0], [4.0, 1.0], [8.0, 1.0]]
    assert schedule_progress([[0.0, 0.0], [4.0, 1.0]], 9.0) == 1.0


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_scheduler_rebuilt_from_a_checkpoint_continues_the_uninterrupted_run(schedule):
    """The worker's path: steps, optimizer state saved after epoch 2, a new optimizer loads it
    and make_scheduler continues; the same --epochs gives exactly the uninterrupted LRs."""
    lr, spe, epochs, done = 0.01, 5, 4, 2

    def session(state, start, knots, end):
        net = torch.nn.Linear(3, 1)
        opt = torch.optim.AdamW(net.parameters(), lr=lr)
        if state is not None:
            opt.load_state_dict(state)
        sched = make_scheduler(opt, lr, schedule, knots, start, spe)
        lrs = []
        for _ in range(start * spe, end * spe):
            lrs.append(opt.param_groups[0]["lr"])
            net(torch.ones(1, 3)).sum().backward()
            opt.step()
            sched.step()
        return lrs, opt.state_dict()

    whole, _ = session(None, 0, fresh_schedule(epochs), epochs)
    first, state = session(None, 0, fresh_schedule(epochs), done)
    rest, _ = session(state, done, fresh_schedule(epochs), epochs)
    assert first + rest == pytest.approx(whole, abs=1e-15)
    # Extended to 8 epochs after epoch 2: the first new step continues where the run was.
    longer, _ = session(state, done, extend_schedule(fresh_schedule(epochs), done, 8), 8)
    assert longer[0] == pytest.approx(whole[done * spe], abs=1e-15)
    assert longer[-1] == pytest.approx(lr * lr_factor_at(schedule, extend_schedule(fresh_schedule(epochs), done, 8),
                                                         8 - 1 / spe))


# ------------------------------------------------------------------- what a run is made from


def _recipe(**kw):
    base = {"data": "s3://b/prepared", "dataset_sha256": "a" * 64, "input_size": [32, 48],
            "classes": ["Sky", "Building"], "model": {"base_channels": 8, "depth": 4}, "lr": 0.003,
            "weight_decay": 0.0, "lr_schedule": "cosine", "batch_size": 4, "class_weighting": "sqrt_median_freq",
            "augment": True, "crop": None, "scale_range": [0.75, 1.5], "seed": 0}
    return {**base, **kw}


def test_resume_refusal_names_each_setting_its_values_and_the_fix():
    run = "s3://b/runs/r"
    assert resume_refusal(run, _recipe(), _recipe()) is None
    msg = resume_refusal(run, _recipe(), _recipe(lr=0.01))
    assert msg == (f"{run} cannot resume: --lr was 0.003, this command has 0.01; pass the same --lr to resume it, "
                   "or a new --name to start a new run")
    msg = resume_refusal(run, _recipe(), _recipe(data="s3://b/other", dataset_sha256="b" * 64))
    assert "--data was s3://b/prepared (32x48, dataset.json sha256 aaaaaaaaaaaa), this command has s3://b/other " \
           "(32x48, dataset.json sha256 bbbbbbbbbbbb); pass the same --data to resume it" in msg
    # Re-prepared with other content at the same size: only the dataset.json identity tells.
    msg = resume_refusal(run, _recipe(), _recipe(dataset_sha256="d" * 64))
    assert msg and "--data s3://b/prepared was re-prepared since the run used it" in msg and "dddddddddddd" in msg
    msg = resume_refusal(run, _recipe(), _recipe(dataset_sha256="c" * 64, input_size=[64, 96]))
    assert "--data s3://b/prepared was re-prepared since the run used it (32x48, dataset.json sha256 aaaaaaaaaaaa; " \
           "now 64x96, dataset.json sha256 cccccccccccc); pass the dataset it was trained on to resume it" in msg
    msg = resume_refusal(run, _recipe(), _recipe(seed=1, crop=[32, 32], augment=False, model={"base_channels": 16,
                                                                                            "depth": 4}))
    assert "--base-channels was 8, this command has 16" in msg and "--seed was 0, this command has 1" in msg
    assert "--crop was whole frames, this command has 32x32" in msg and "augmentation (--no-augment) was on" in msg
    assert msg.endswith("pass the same --base-channels, augmentation (--no-augment), --crop and --seed to resume it, "
                        "or a new --name to start a new run") and "\n" not in msg
    for key, value in [("weight_decay", 0.1), ("lr_schedule", "constant"), ("batch_size", 8),
                       ("class_weighting", "none"), ("scale_range", [0.5, 2.0])]:
        assert resume_refusal(run, _recipe(), _recipe(**{key: value})), key


def test_legacy_checkpoints_are_compared_on_what_they_recorded():
    meta = {"model_config": {"base_channels": 8, "depth": 4}, "classes": ["Sky", "Building"],
            "config": {"data": "s3://b/prepared", "lr": 0.003, "epochs": 4, "crop": None, "scale_range": [0.75, 1.5],
                       **{k: _recipe()[k] for k in ("weight_decay", "lr_schedule", "batch_size", "class_weighting",
                                                     "augment", "seed")}}}
    old = legacy_recipe(meta)
    assert "dataset_sha256" not in old and "input_size" not in old  # unknown: not compared
    assert resume_refusal("r", old, _recipe()) is None
    assert "--lr was 0.003" in resume_refusal("r", old, _recipe(lr=0.01))
    assert "--data was s3://b/prepared" in resume_refusal("r", old, _recipe(data="s3://b/x"))
    assert "--base-channels was 8" in resume_refusal("r", old, _recipe(model={"base_channels": 4, "depth": 4}))


def test_recipe_records_the_dataset_and_the_locked_settings(tmp_path):
    ok = _dataset(tmp_path, {"train": 4, "val": 2})
    info = _check_dataset(_config(data=ok))
    r = runrecord.recipe(_config(data=ok, augmentation=Augmentation(crop=(16, 16)), lr=0.5), info, train.dataset_sha256(ok))
    assert r["data"] == ok and r["input_size"] == [8, 8] and r["classes"] == list(info.classes)
    assert r["dataset_sha256"] == __import__("hashlib").sha256((tmp_path / "prepared" / "dataset.json").read_bytes()) \
        .hexdigest()
    assert r["crop"] == [16, 16] and r["scale_range"] == [0.75, 1.5] and r["lr"] == 0.5
    assert json.loads(json.dumps(r)) == r  # compared after a JSON round trip
    assert "epochs" not in r and "num_workers" not in r


# ----------------------------------------------------------------------------------- config


def _config(**kw):
    return TrainConfig(**{"data": "/tmp/d", "storage": "/tmp/s", "name": "run", **kw})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"epochs": 0}, "--epochs"),
        ({"num_workers": 0}, "--num-workers"),
        ({"batch_size": -1}, "--batch-size"),
        ({"base_channels": 0}, "--base-channels"),
        ({"threads": 0}, "--threads"),
        ({"lr": 0.0}, "--lr"),
        ({"lr": float("nan")}, "--lr"),
        ({"weight_decay": -0.1}, "--weight-decay"),
        ({"lr_schedule": "step"}, "valid: constant, cosine, onecycle"),
        ({"class_weighting": "inverse"}, "valid: median_freq, sqrt_median_freq, none"),
        ({"name": "a/b"}, "--name"),
        ({"name": ""}, "--name"),
        ({"data": ""}, "--data"),
        ({"max_failures": -2}, "--max-failures"),
        ({"epochs": True}, "--epochs"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(TrainError, match=match):
        _config(**kw)


def test_config_defaults_and_derived_values():
    c = _config()
    assert c.lr == 1e-3 and c.lr_schedule == "constant" and c.class_weighting == "sqrt_median_freq" and c.augmentation.enabled
    assert c.torch_threads == 1 and _config(cpus_per_worker=3).torch_threads == 3
    assert _config(threads=2).torch_threads == 2
    assert c.run_uri == "/tmp/s/run"
    assert _config(storage="s3://b/runs/").run_uri == "s3://b/runs/run"
    assert c.model_args(11)["base_channels"] == 64 and c.model_args(4)["num_classes"] == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.epochs = 3


# ---------------------------------------------------------------- checks before any worker


def _dataset(tmp_path, splits):
    from segray.dataset import DatasetInfo, write_info

    root = tmp_path / "prepared"
    for split in splits:
        (root / split).mkdir(parents=True)
        (root / split / "part-0.parquet").write_bytes(b"not read by the check")
    write_info(str(root), DatasetInfo(height=8, width=8, splits=splits, class_pixel_counts=[1] * NUM_CLASSES,
                                      void_pixel_count=0, source="x", layout="segnet"))
    return str(root)


def test_check_dataset_refuses_missing_and_incomplete(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        _check_dataset(_config(data=str(tmp_path / "nothing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no dataset.json"):
        _check_dataset(_config(data=str(tmp_path / "empty")))
    only_train = _dataset(tmp_path / "a", {"train": 4})
    with pytest.raises(DatasetError, match="no 'val' rows"):
        _check_dataset(_config(data=only_train))
    ok = _dataset(tmp_path / "b", {"train": 4, "val": 2})
    assert _check_dataset(_config(data=ok)).splits == {"train": 4, "val": 2}
    with pytest.raises(TrainError, match="lower --num-workers"):
        _check_dataset(_config(data=ok, num_workers=5))
    # dataset.json promises val rows but the folder is gone: an interrupted copy.
    import shutil

    shutil.rmtree(tmp_path / "b" / "prepared" / "val")
    with pytest.raises(DatasetError, match="incomplete"):
        _check_dataset(_config(data=ok))


def test_check_dataset_uses_the_files_dataset_json_lists(tmp_path):
    from segray.dataset import DatasetInfo, write_info

    root = tmp_path / "prepared"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        (root / split / "run1_0.parquet").write_bytes(b"x")
    files = {"train": ["train/run1_0.parquet"], "val": ["val/run1_0.parquet", "val/run1_1.parquet"]}
    write_info(str(root), DatasetInfo(height=8, width=8, splits={"train": 4, "val": 2}, class_pixel_counts=[1] * NUM_CLASSES,
                                      void_pixel_count=0, source="x", layout="segnet", files=files))
    # A listed file that is not there: incomplete, named.
    with pytest.raises(DatasetError, match=r"val/run1_1.parquet: listed in dataset.json but missing"):
        _check_dataset(_config(data=str(root)))
    (root / "val" / "run1_1.parquet").write_bytes(b"x")
    assert _check_dataset(_config(data=str(root))).files == files
    # Files of the folder that dataset.json does not list are not part of it (and not needed).
    (root / "train" / "leftover.parquet").write_bytes(b"x")
    (root / "train" / "run1_0.parquet").unlink()
    with pytest.raises(DatasetError, match="run1_0.parquet: listed in dataset.json but missing"):
        _check_dataset(_config(data=str(root)))


def test_check_dataset_refuses_a_foreign_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DatasetError, match="format"):
        _check_dataset(_config(data=str(tmp_path)))


def test_summary_numbers_are_json_safe():
    from segray.runrecord import jsonable

    assert jsonable({"a": [1.0, float("nan")], "b": {"c": math.inf}}) == {"a": [1.0, None], "b": {"c": None}}


# ------------------------------------------------------------------------ in-memory shards


def test_array_batches_cover_the_shard_in_order_and_match_the_streamed_format():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (7, 4, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 12, (7, 4, 6), dtype=np.uint8)
    order = rng.permutation(7)
    batches = list(worker.array_batches((images, labels), 3, order, torch.device("cpu"), False))
    assert [len(x) for x, _ in batches] == [3, 3, 1]
    seen = np.concatenate([y.numpy() for _, y in batches])
    # Each batch holds the rows of its slice of ``order`` (sorted inside the batch).
    expected = np.concatenate([labels[np.sort(order[k:k + 3])] for k in range(0, 7, 3)])
    np.testing.assert_array_equal(seen, expected)
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (3, 3, 4, 6) and y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy(), modelio.images_to_tensor(images[np.sort(order[:3])]).numpy())


def test_shard_cache_fits_by_bytes_and_env(monkeypatch):
    # 100 train + 10 val rows over 2 workers: 50 + 5 rows of 4 bytes a pixel.
    assert train.shard_cache_fits(100, 10, 2, 176, 240)
    assert train.shard_cache_fits(100, 10, 2, 176, 240, 55 * 176 * 240 * 4)
    assert not train.shard_cache_fits(100, 10, 2, 176, 240, 55 * 176 * 240 * 4 - 1)
    assert not train.shard_cache_fits(1, 1, 1, 1, 1, 0)
    # The environment is read once, at the edge: jobs/train.py turns it into the config's field.
    from segray.commands import train as job  # what jobs/train.py runs
    argv = ["--data", "d", "--storage", "s", "--name", "n"]
    assert job.config_from_args(job.build_parser().parse_args(argv)).shard_cache_bytes == train.CACHE_SHARD_MAX_BYTES
    monkeypatch.setenv("SEGRAY_SHARD_CACHE_BYTES", "0")
    assert job.config_from_args(job.build_parser().parse_args(argv)).shard_cache_bytes == 0


def test_a_network_argument_added_after_the_run_is_compared_with_its_default():
    # Runs recorded before the U-Net had `dropout` resume with dropout 0 (what they trained with)
    # and are refused with any other value.
    old = _recipe(arch="unet", model={"in_channels": 3, "num_classes": 2, "base_channels": 8, "depth": 4})
    same = _recipe(arch="unet", model={**old["model"], "dropout": 0.0})
    assert resume_refusal("r", old, same) is None
    msg = resume_refusal("r", old, _recipe(arch="unet", model={**old["model"], "dropout": 0.3}))
    assert msg and "--arch-arg dropout was 0.0, this command has 0.3" in msg
