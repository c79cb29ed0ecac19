"""Blind training: noise.level as a range [min, max], a level per image (NumPy, TensorFlow, the training batches),
a single level unchanged, the evaluation over the range and the card's trained_noise."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest
import tensorflow as tf

from dae.evaluation import evaluate_denoiser, evaluation_noises, noise_label, training_levels
from dae.noise import add_noise, add_noise_tf, image_levels, image_levels_tf
from dae.spec import ModelCard, NoiseSpec, TrainingSpec
from dae.training.batches import noisy_batches, validation_pairs

GRAY = 0.5  # constant clean images: the noise of each image is then all there is to see


def _gray(count: int, size: int = 16, channels: int = 1) -> np.ndarray:
    return np.full((count, size, size, channels), GRAY, np.float32)


# ---------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------


def test_a_level_is_a_number_or_a_range():
    assert NoiseSpec().level == 0.3 and not NoiseSpec().is_range
    assert TrainingSpec().noise == NoiseSpec(level=[0.05, 0.5])  # the default job trains blind (issue 16)
    assert NoiseSpec(level=1).level == 1.0 and isinstance(NoiseSpec(level=1).level, float)
    blind = NoiseSpec(level=[0.05, 0.5])
    assert blind.is_range and blind.level_range == (0.05, 0.5)
    assert NoiseSpec(level=(0.2, 0.2)).level == [0.2, 0.2]  # min == max is a range too
    assert NoiseSpec(type="masking", level=[0, 1]).level_range == (0.0, 1.0)
    # A number serializes as before (the same spec JSON, so the same fingerprints); a range as a list.
    assert TrainingSpec(noise={"level": 0.3}).model_dump()["noise"] == {"type": "gaussian", "level": 0.3, "clip": True}
    spec = TrainingSpec.model_validate({"noise": {"type": "speckle", "level": [0.1, 0.3]}})
    assert TrainingSpec.model_validate_json(spec.model_dump_json()) == spec
    assert blind.at_level(0.2) == NoiseSpec(level=0.2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"level": [0.5, 0.1]}, r"Expected min <= max. Received: level=\[0.5, 0.1\]"),
        ({"level": [0.1]}, r"Expected a list of 2 numbers. Received: level=\[0.1\] \(1 items\)"),
        ({"level": [0.1, 0.2, 0.3]}, r"Expected a list of 2 numbers. Received: level=\[0.1, 0.2, 0.3\]"),
        ({"level": [0.1, 2.5]}, r"Expected 0 <= level <= 2. Received: level=\[0.1, 2.5\]"),
        ({"level": [-0.1, 0.5]}, r"Expected 0 <= level <= 2. Received: level=\[-0.1, 0.5\]"),
        ({"level": 3}, r"Expected 0 <= level <= 2. Received: level=3"),
        ({"level": [0.1, "x"]}, r"Expected finite numbers. Received: level=\[0.1, 'x'\]"),
        ({"level": "lots"}, r"Expected finite numbers. Received: level='lots'"),
        ({"level": True}, r"Expected finite numbers. Received: level=True"),
        ({"level": float("nan")}, r"Expected finite numbers. Received: level=nan"),
        ({"type": "masking", "level": [0.1, 1.2]}, r"Expected 0 <= level <= 1. Received: level=\[0.1, 1.2\]"),
        ({"type": "salt_pepper", "level": 1.5}, r"Expected 0 <= level <= 1. Received: level=1.5"),
    ],
)
def test_bad_levels_are_refused_with_what_was_expected(fields, message):
    with pytest.raises(ValueError, match=message):
        NoiseSpec.model_validate(fields)


# ---------------------------------------------------------------------------------------------
# NumPy noise
# ---------------------------------------------------------------------------------------------


def test_a_single_level_gives_the_same_noise_as_before():
    clean = np.random.default_rng(0).random((3, 5, 6, 2), dtype=np.float32)
    # Today's formulas, written out: no levels are drawn, so the generator's first draws are the noise.
    expected = np.clip(clean + np.float32(0.3) * np.random.default_rng([1, 2]).standard_normal(clean.shape,
                                                                                            dtype=np.float32), 0, 1)
    np.testing.assert_array_equal(add_noise(clean, NoiseSpec(level=0.3), seed=[1, 2]), expected)
    draw = np.random.default_rng(7).random((3, 5, 6, 1), dtype=np.float32)
    np.testing.assert_array_equal(
        add_noise(clean, NoiseSpec(type="masking", level=0.4), seed=7), np.where(draw < np.float32(0.4), 0.0, clean)
    )
    seed = tf.constant([3, 4], tf.int64)
    expected_tf = clean * (1.0 + 0.2 * tf.random.stateless_normal(clean.shape, seed=seed, dtype=tf.float32))
    tensor = add_noise_tf(clean, NoiseSpec(type="speckle", level=0.2, clip=False), seed)
    np.testing.assert_array_equal(tensor.numpy(), expected_tf.numpy())


@pytest.mark.parametrize("noise_type", ["gaussian", "speckle"])
def test_each_image_gets_its_own_stddev_from_the_range(noise_type):
    noise = NoiseSpec(type=noise_type, level=[0.05, 0.5], clip=False)
    noisy = add_noise(_gray(64, 32), noise, seed=[3, 1])
    scale = GRAY if noise_type == "speckle" else 1.0
    measured = (noisy - GRAY).std(axis=(1, 2, 3)) / scale
    levels = image_levels(noise, 64, seed=[3, 1])
    np.testing.assert_allclose(measured, levels, rtol=0.1)
    assert levels.min() >= 0.05 and levels.max() <= 0.5
    assert len(np.unique(levels)) == 64 and levels.max() - levels.min() > 0.3  # they spread over the range
    np.testing.assert_array_equal(add_noise(_gray(64, 32), noise, seed=[3, 1]), noisy)  # reproducible
    assert not np.array_equal(image_levels(noise, 64, seed=[3, 2]), levels)


@pytest.mark.parametrize("noise_type", ["masking", "salt_pepper"])
def test_each_image_gets_its_own_fraction_from_the_range(noise_type):
    noise = NoiseSpec(type=noise_type, level=[0.1, 0.6])
    noisy = add_noise(_gray(32, 32, channels=3), noise, seed=5)
    corrupted = (noisy[..., 0] != GRAY).mean(axis=(1, 2))
    np.testing.assert_allclose(corrupted, image_levels(noise, 32, seed=5), atol=0.06)
    assert (noisy[..., 0] == noisy[..., 2]).all()  # still whole pixels


def test_a_single_image_draws_one_level():
    noise = NoiseSpec(level=[0.1, 0.2], clip=False)
    noisy = add_noise(_gray(1, 64)[0], noise, seed=9)
    assert noisy.shape == (64, 64, 1)
    assert 0.09 < float((noisy - GRAY).std()) < 0.22


def test_tensorflow_noise_gets_a_level_per_image_and_the_same_noise_pattern():
    seed = tf.constant([11, 12], tf.int64)
    blind = add_noise_tf(_gray(16), NoiseSpec(level=[0.1, 0.4], clip=False), seed).numpy()
    unit = add_noise_tf(_gray(16), NoiseSpec(level=1.0, clip=False), seed).numpy()
    levels = image_levels_tf(NoiseSpec(level=[0.1, 0.4]), 16, seed).numpy()
    # The same standard-normal draws as at level 1, each image scaled by its own level.
    np.testing.assert_allclose(blind - GRAY, levels[:, None, None, None] * (unit - GRAY), atol=1e-6)
    assert levels.min() >= 0.1 and levels.max() <= 0.4 and len(np.unique(levels)) == 16


# ---------------------------------------------------------------------------------------------
# Training batches
# ---------------------------------------------------------------------------------------------


def _batch_levels(noise: NoiseSpec, seed: int, *, epochs: int = 2, count: int = 48, batch_size: int = 16):
    """The level every image of every batch got: its noise over the noise of the same batches at level 1."""
    unit = NoiseSpec(type=noise.type, level=1.0, clip=False)
    images = _gray(count, 8)
    levels = []
    for (blind, _), (reference, _) in zip(
        noisy_batches(images, batch_size, noise, seed, first_epoch=1, last_epoch=epochs),
        noisy_batches(images, batch_size, unit, seed, first_epoch=1, last_epoch=epochs),
        strict=True,
    ):
        blind_noise, unit_noise = blind.numpy() - GRAY, reference.numpy() - GRAY
        level = np.median(blind_noise / unit_noise, axis=(1, 2, 3))
        np.testing.assert_allclose(blind_noise, level[:, None, None, None] * unit_noise, atol=1e-6)  # one per image
        levels.append(level)
    return np.stack(levels).reshape(epochs, count // batch_size, batch_size)


def test_training_batches_draw_a_fresh_level_for_every_image_of_every_batch():
    noise = NoiseSpec(level=[0.05, 0.5], clip=False)
    levels = _batch_levels(noise, seed=4)
    assert levels.min() >= 0.05 - 1e-6 and levels.max() <= 0.5 + 1e-6
    for epoch in levels:
        for batch in epoch:
            assert len(np.unique(np.round(batch, 6))) == len(batch)  # they differ within a batch
    assert not np.allclose(levels[0, 0], levels[0, 1])  # between batches
    assert not np.allclose(levels[0], levels[1])  # between epochs
    np.testing.assert_array_equal(_batch_levels(noise, seed=4), levels)  # the same seed, the same levels
    assert not np.allclose(_batch_levels(noise, seed=5), levels)


def test_training_batches_of_a_single_level_are_unchanged():
    images = np.random.default_rng(2).random((20, 6, 6, 1), dtype=np.float32)
    noise = NoiseSpec(level=0.2)
    first = [noisy.numpy() for noisy, _ in noisy_batches(images, 8, noise, 3, first_epoch=1, last_epoch=1)]
    # Batch b of epoch 1 is noised with the stateless seed (seed, 1·1,000,003 + b), as documented in batches.py.
    order = np.random.default_rng([3, 1]).permutation(20)
    for batch_index, noisy in enumerate(first):
        clean = images[order[batch_index * 8 : (batch_index + 1) * 8]]
        seed = tf.constant([3, 1_000_003 + batch_index], tf.int64)
        expected = tf.clip_by_value(clean + 0.2 * tf.random.stateless_normal(clean.shape, seed=seed), 0.0, 1.0)
        np.testing.assert_array_equal(noisy, expected.numpy())


def test_validation_images_cover_the_range_with_fixed_levels():
    noise = NoiseSpec(level=[0.1, 0.3], clip=False)
    noisy, clean = validation_pairs(_gray(40, 32), noise, seed=1)
    measured = (noisy - clean).std(axis=(1, 2, 3))
    assert 0.08 < measured.min() < 0.15 and 0.25 < measured.max() < 0.33
    np.testing.assert_array_equal(validation_pairs(_gray(40, 32), noise, seed=1)[0], noisy)


# ---------------------------------------------------------------------------------------------
# Evaluation and the model card
# ---------------------------------------------------------------------------------------------


def test_the_evaluation_covers_the_training_range():
    labels = [noise_label(noise) for noise in evaluation_noises(NoiseSpec(level=[0.05, 0.5]))]
    assert labels == ["gaussian:0.05", "gaussian:0.1", "gaussian:0.2", "gaussian:0.275", "gaussian:0.3",
                      "gaussian:0.5"]
    labels = [noise_label(noise) for noise in evaluation_noises(NoiseSpec(type="masking", level=[0.2, 0.4]))]
    assert labels == ["masking:0.2", "masking:0.3", "masking:0.4", "gaussian:0.1", "gaussian:0.2", "gaussian:0.3",
                      "gaussian:0.5"]
    assert training_levels(NoiseSpec(type="speckle", level=[0.15, 0.25], clip=False)) == [0.15, 0.2, 0.25]
    assert training_levels(NoiseSpec(level=0.3)) == [0.3]  # a single level: evaluated as before
    assert noise_label(NoiseSpec(level=[0.05, 0.5], clip=False)) == "gaussian:0.05..0.5:unclipped"
    clean = np.random.default_rng(0).random((6, 8, 8, 1), dtype=np.float32)
    rows = evaluate_denoiser(lambda noisy: noisy, clean, NoiseSpec(level=[0.1, 0.3]), baselines=False)
    assert [(row.noise, row.method) for row in rows][:6] == [
        ("gaussian:0.1", "noisy"), ("gaussian:0.1", "model"), ("gaussian:0.2", "noisy"), ("gaussian:0.2", "model"),
        ("gaussian:0.3", "noisy"), ("gaussian:0.3", "model"),
    ]
    assert {row.noise for row in rows} == {"gaussian:0.1", "gaussian:0.2", "gaussian:0.3", "gaussian:0.5"}


def _card(noise: dict) -> ModelCard:
    return ModelCard(
        id="m_0123456789ab", name="blind", version=1, created_at=datetime.now(UTC),
        spec=TrainingSpec.model_validate({"noise": noise}), input_shape=[None, None, 1], trained_shape=[28, 28, 1],
        parameters=1,
    )


def test_the_card_says_what_noise_the_model_was_trained_for():
    blind = _card({"level": [0.05, 0.5]})
    assert blind.trained_noise.model_dump() == {
        "type": "gaussian", "min_level": 0.05, "max_level": 0.5, "blind": True, "clip": True
    }
    dumped = blind.model_dump(mode="json")
    assert dumped["trained_noise"]["blind"] is True
    assert ModelCard.model_validate_json(blind.model_dump_json()) == blind  # the derived field reads back
    single = _card({"type": "masking", "level": 0.2}).trained_noise
    assert (single.type, single.min_level, single.max_level, single.blind) == ("masking", 0.2, 0.2, False)
    assert "trained_noise" in ModelCard.model_json_schema(mode="serialization")["properties"]
