"""dae.evaluation.helper: the helper process computes exactly the inline reference rows, and publishing survives its loss."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import numpy as np
import pytest

from dae.evaluation import helper as reference_helper
from dae.evaluation import report
from dae.spec import NoiseSpec


@pytest.fixture
def helper() -> Iterator[None]:
    reference_helper.start_helper(wait=True)
    try:
        yield
    finally:
        reference_helper.stop_helper()


def small_images() -> np.ndarray:
    rng = np.random.default_rng(8)
    return rng.random((30, 12, 12, 1)).astype(np.float32)


def test_without_a_helper_the_rows_are_computed_inline() -> None:
    assert not reference_helper.helper_running()
    noise = NoiseSpec(type="speckle", level=0.2)
    later = reference_helper.reference_rows_later(small_images(), noise, seed=2)
    assert later() == report.reference_rows(small_images(), noise, seed=2)


@pytest.mark.usefixtures("helper")
def test_the_helper_computes_the_same_rows_as_inline() -> None:
    images = np.random.default_rng(9).random((600, 8, 8, 1)).astype(np.float32)  # more than the 512-image subset
    noise = NoiseSpec(type="gaussian", level=0.3)
    helper_pid = reference_helper.helper_process().pid
    rows = reference_helper.reference_rows_later(images, noise, seed=7)()
    assert rows == report.reference_rows(images, noise, seed=7)  # every number, exactly
    assert [row.images for row in rows[:3]] == [512, 128, 64]
    # A second request reuses the same process; an unread reply (a failed publish) is dropped, not confused.
    reference_helper.reference_rows_later(images, NoiseSpec(type="masking", level=0.1), seed=1)
    again = reference_helper.reference_rows_later(images, noise, seed=7)()
    assert again == rows and reference_helper.helper_process().pid == helper_pid


@pytest.mark.usefixtures("helper")
def test_a_dead_helper_falls_back_to_inline() -> None:
    noise = NoiseSpec(type="gaussian", level=0.1)
    later = reference_helper.reference_rows_later(small_images(), noise, seed=3)
    os.kill(reference_helper.helper_process().pid, signal.SIGKILL)
    assert later() == report.reference_rows(small_images(), noise, seed=3)
    assert not reference_helper.helper_running()
    assert reference_helper.reference_rows_later(small_images(), noise, seed=3)() == later()


def test_stop_helper_ends_the_process() -> None:
    reference_helper.start_helper(wait=True)
    process = reference_helper.helper_process()
    reference_helper.stop_helper()
    assert process.poll() == 0 and not reference_helper.helper_running()
