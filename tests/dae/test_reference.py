"""dae.reference: the helper process computes exactly the inline reference rows, and publishing survives its loss."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest

from dae import metrics, reference
from dae.spec import NoiseSpec


@pytest.fixture
def helper() -> Iterator[None]:
    reference.start_helper(wait=True)
    try:
        yield
    finally:
        reference.stop_helper()


def small_images() -> np.ndarray:
    rng = np.random.default_rng(8)
    return rng.random((30, 12, 12, 1)).astype(np.float32)


def test_without_a_helper_the_rows_are_computed_inline() -> None:
    assert not reference.helper_running()
    noise = NoiseSpec(type="speckle", level=0.2)
    later = reference.reference_rows_later(small_images(), noise, seed=2)
    assert later() == metrics.reference_rows(small_images(), noise, seed=2)


def test_the_helper_computes_the_same_rows_as_inline(helper: None) -> None:
    images = np.random.default_rng(9).random((600, 8, 8, 1)).astype(np.float32)  # more than the 512-image subset
    noise = NoiseSpec(type="gaussian", level=0.3)
    helper_pid = reference._helper.process.pid
    rows = reference.reference_rows_later(images, noise, seed=7)()
    assert rows == metrics.reference_rows(images, noise, seed=7)  # every number, exactly
    assert [row.images for row in rows[:3]] == [512, 128, 64]
    # A second request reuses the same process; an unread reply (a failed publish) is dropped, not confused.
    reference.reference_rows_later(images, NoiseSpec(type="masking", level=0.1), seed=1)
    again = reference.reference_rows_later(images, noise, seed=7)()
    assert again == rows and reference._helper.process.pid == helper_pid


def test_a_dead_helper_falls_back_to_inline(helper: None) -> None:
    noise = NoiseSpec(type="gaussian", level=0.1)
    later = reference.reference_rows_later(small_images(), noise, seed=3)
    os.kill(reference._helper.process.pid, signal.SIGKILL)
    assert later() == metrics.reference_rows(small_images(), noise, seed=3)
    assert not reference.helper_running()
    assert reference.reference_rows_later(small_images(), noise, seed=3)() == later()


def test_stop_helper_ends_the_process() -> None:
    reference.start_helper(wait=True)
    process = reference._helper.process
    reference.stop_helper()
    assert process.poll() == 0 and not reference.helper_running()
