"""loss.level_weighting: blind training weighs each image's loss by (min/level)^k, the weights averaging 1 over the
range; the spec refuses it without a range, the batches and the validation set carry each image's weight, and a
weighted model denoises light noise better than an unweighted one."""

from __future__ import annotations

import numpy as np
import pytest

from dae.data import load_dataset
from dae.evaluation.metrics import psnr_per_image
from dae.losses import level_weights
from dae.noise import add_noise, image_levels
from dae.spec import NoiseSpec, TrainingSpec
from dae.training import fit_autoencoder
from dae.training.batches import VALIDATION_NOISE_STREAM, noisy_batches, validation_pairs

GRAY = 0.5  # constant clean images: the noise of each image is then all there is to see
RANGE = (0.1, 0.5)


def _gray(count: int, size: int = 8) -> np.ndarray:
    return np.full((count, size, size, 1), GRAY, np.float32)


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 2.0, 4.0])
def test_weights_average_one_over_the_range_and_fall_with_the_level(power):
    levels = np.linspace(*RANGE, 200_001)
    weights = level_weights(levels, RANGE, power)
    assert weights.mean() == pytest.approx(1.0, rel=1e-4)
    # (min/level)^k: the lightest image weighs (max/min)^k times the heaviest.
    assert weights[0] / weights[-1] == pytest.approx(5.0**power)
    assert np.all(np.diff(weights) <= 0)


def test_weights_work_on_tensorflow_levels_too():
    import tensorflow as tf

    levels = np.array([0.1, 0.2, 0.5], np.float32)
    np.testing.assert_allclose(
        level_weights(tf.constant(levels), RANGE, 2.0).numpy(), level_weights(levels, RANGE, 2.0), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("noise", "weighting", "received"),
    [
        ({"level": 0.3}, 2, "noise.level=0.3"),
        ({"level": [0.0, 0.5]}, 2, "noise.level=[0.0, 0.5]"),
        ({"level": [0.2, 0.2]}, 1, "noise.level=[0.2, 0.2]"),
    ],
)
def test_weighting_without_a_blind_range_is_refused_with_what_was_expected(noise, weighting, received):
    with pytest.raises(ValueError, match="Expected noise.level a range") as refused:
        TrainingSpec.model_validate({"noise": noise, "loss": {"level_weighting": weighting}})
    assert received in str(refused.value)


@pytest.mark.parametrize("weighting", [-1, 4.5])
def test_weighting_outside_its_bounds_is_refused(weighting):
    with pytest.raises(ValueError, match="level_weighting"):
        TrainingSpec.model_validate({"noise": {"level": [0.1, 0.5]}, "loss": {"level_weighting": weighting}})


def test_no_weighting_is_the_default_and_leaves_the_batches_as_pairs():
    assert TrainingSpec().loss.level_weighting == 0
    noise = NoiseSpec(level=list(RANGE), clip=False)
    batch = next(iter(noisy_batches(_gray(16), 8, noise, 1, first_epoch=1, last_epoch=1)))
    assert len(batch) == 2
    assert len(validation_pairs(_gray(4), noise, seed=1)) == 2


def test_every_training_image_carries_the_weight_of_its_own_level():
    noise = NoiseSpec(level=list(RANGE), clip=False)
    unit = NoiseSpec(level=1.0, clip=False)
    images = _gray(48)
    weighted = noisy_batches(images, 16, noise, 7, first_epoch=1, last_epoch=2, level_weighting=2.0)
    plain = noisy_batches(images, 16, noise, 7, first_epoch=1, last_epoch=2)
    reference = noisy_batches(images, 16, unit, 7, first_epoch=1, last_epoch=2)
    batches = 0
    for (noisy, clean, weights), (plain_noisy, _), (unit_noisy, _) in zip(weighted, plain, reference, strict=True):
        np.testing.assert_array_equal(noisy.numpy(), plain_noisy.numpy())  # the weights change no noise
        np.testing.assert_array_equal(clean.numpy(), images[:16])
        # Each image's level: its noise over the same batch's noise at level 1 (same stateless draw).
        levels = np.median((noisy.numpy() - GRAY) / (unit_noisy.numpy() - GRAY), axis=(1, 2, 3))
        np.testing.assert_allclose(weights.numpy(), level_weights(levels, RANGE, 2.0), rtol=1e-4)
        assert weights.numpy().max() / weights.numpy().min() > 2  # levels differ, so do weights
        batches += 1
    assert batches == 6


def test_the_validation_images_carry_the_weights_of_their_fixed_levels():
    noise = NoiseSpec(level=list(RANGE), clip=False)
    noisy, clean, weights = validation_pairs(_gray(40, 32), noise, seed=1, level_weighting=1.0)
    np.testing.assert_array_equal(noisy, validation_pairs(_gray(40, 32), noise, seed=1)[0])
    measured = (noisy - clean).std(axis=(1, 2, 3))
    np.testing.assert_allclose(weights, level_weights(measured, RANGE, 1.0), rtol=0.1)  # ~2 % stddev error
    fixed_levels = image_levels(noise, 40, seed=[1, VALIDATION_NOISE_STREAM])  # the levels add_noise drew
    np.testing.assert_allclose(weights, level_weights(fixed_levels, RANGE, 1.0), rtol=1e-6)
    assert weights.dtype == np.float32


def test_a_weighted_blind_model_denoises_light_noise_better_and_heavy_noise_less():
    full = load_dataset("digits")
    job = {
        "dataset": "digits",
        "architecture": {"type": "unet", "filters": [16, 32], "convs_per_level": 1},
        "noise": {"level": list(RANGE)},
        "epochs": 4,
        "batch_size": 32,
        "optimizer": {"learning_rate": 0.003},
    }
    psnr = {}
    for weighting in (0.0, 3.0):
        spec = TrainingSpec.model_validate({**job, "loss": {"type": "mse", "level_weighting": weighting}})
        model = fit_autoencoder(spec, full).model
        psnr[weighting] = {
            level: float(psnr_per_image(full.test, np.clip(model.predict(
                add_noise(full.test, NoiseSpec(level=level), seed=11), verbose=0), 0, 1)).mean())
            for level in RANGE
        }
    assert psnr[3.0][0.1] > psnr[0.0][0.1] + 1.0, psnr
    assert psnr[3.0][0.5] < psnr[0.0][0.5], psnr
