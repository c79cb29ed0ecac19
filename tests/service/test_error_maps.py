"""Error maps and their statistics against NumPy's own definitions."""

from __future__ import annotations

import numpy as np
import pytest

from service.imaging.error_maps import ErrorMaps, l1_error_maps, max_and_percentile_rows

RNG = np.random.default_rng(3)


@pytest.mark.parametrize("shape", [(1, 784), (5, 784), (3, 1), (2, 2), (4, 100), (1, 9), (2, 101)])
@pytest.mark.parametrize("percent", [99.0, 50.0, 0.0, 100.0])
def test_max_and_percentile_match_numpy(shape, percent):
    flat = RNG.random(shape, dtype=np.float32)
    before = flat.copy()
    top, value = max_and_percentile_rows(flat, percent)
    np.testing.assert_array_equal(top, flat.max(axis=1))
    np.testing.assert_allclose(value, np.percentile(flat, percent, axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(flat, before)  # the input is not reordered in place


def test_l1_maps_average_the_channels():
    reference, outputs = RNG.random((2, 4, 5, 3), dtype=np.float32), RNG.random((2, 4, 5, 3), dtype=np.float32)
    np.testing.assert_allclose(l1_error_maps(reference, outputs), np.abs(reference - outputs).mean(axis=-1), atol=1e-7)
    gray = l1_error_maps(reference[..., :1], outputs[..., :1])
    np.testing.assert_array_equal(gray, np.abs(reference[..., 0] - outputs[..., 0]))


def test_statistics_and_row_slices():
    maps = RNG.random((4, 6, 6), dtype=np.float32)
    errors = ErrorMaps.of(maps)
    part = errors.rows(1, 3)
    assert part.maps.shape == (2, 6, 6)
    stats = part.stats()
    assert [entry["max"] for entry in stats] == pytest.approx(maps[1:3].reshape(2, -1).max(axis=1).tolist())
    assert [entry["mean"] for entry in stats] == pytest.approx(maps[1:3].reshape(2, -1).mean(axis=1).tolist(), rel=1e-6)
    assert [entry["p99"] for entry in stats] == pytest.approx(np.percentile(maps[1:3].reshape(2, -1), 99, axis=1).tolist(),
                                                              rel=1e-6)
    assert all(type(value) is float for entry in stats for value in entry.values())
