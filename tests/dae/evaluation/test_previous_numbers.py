"""SSIM and TV through scikit-image give the numbers of the hand-written versions they replaced (2026-12-02).

The expected values were recorded from dae/metrics.py (vectorized SSIM, batched Chambolle TV) on these fixed inputs,
before it moved to dae/evaluation/ and its copies of scikit-image's algorithms were dropped.
"""

from __future__ import annotations

import numpy as np
import pytest

from dae.evaluation import baselines, metrics, report
from dae.noise import add_noise
from dae.spec import NoiseSpec

PREVIOUS_SSIM = {
    (4, 28, 28, 1): [0.8437100147919672, 0.8367947077933231, 0.8090262310868613, 0.8298718240647294],
    (3, 9, 10, 3): [0.8294208263965613, 0.8117111791966597, 0.8272586423074556],
    (2, 5, 6, 1): [0.8811077386518686, 0.8239034638795589],
}
SSIM_SEEDS = {(4, 28, 28, 1): 11, (3, 9, 10, 3): 12, (2, 5, 6, 1): 13}

#: Per-image means and the first six values of each denoised image.
PREVIOUS_TV = {
    "gray": (
        [0.4938403367996216, 0.4700964093208313, 0.4823330044746399, 0.4697608947753906, 0.47387734055519104],
        [
            [
                0.7122803926467896,
                0.5940535068511963,
                0.5961007475852966,
                0.5784576535224915,
                0.6140544414520264,
                0.6210475564002991,
            ],
            [
                0.6310385465621948,
                0.6656684279441833,
                0.6040939092636108,
                0.6219708919525146,
                0.6997429728507996,
                0.6995956301689148,
            ],
            [
                0.4452657699584961,
                0.4461880028247833,
                0.44742172956466675,
                0.4492409825325012,
                0.4744991362094879,
                0.47924625873565674,
            ],
            [
                0.44095319509506226,
                0.4385906755924225,
                0.4297926425933838,
                0.4292543828487396,
                0.5010720491409302,
                0.5004613995552063,
            ],
            [
                0.2414761632680893,
                0.5499255657196045,
                0.5562132596969604,
                0.5336945652961731,
                0.40501669049263,
                0.4061061143875122,
            ],
        ],
    ),
    "color": (
        [0.4986100196838379, 0.537883996963501, 0.501658022403717],
        [
            [
                0.6730105876922607,
                0.5732108354568481,
                0.5741984248161316,
                0.669888436794281,
                0.5742284059524536,
                0.5555732846260071,
            ],
            [
                0.5645383596420288,
                0.3590415418148041,
                0.7094599008560181,
                0.5615065097808838,
                0.5807287693023682,
                0.4376063942909241,
            ],
            [
                0.7332926392555237,
                0.39625006914138794,
                0.5179630517959595,
                0.7257656455039978,
                0.4113107919692993,
                0.4698510766029358,
            ],
        ],
    ),
}

#: (noise, method, images, psnr, ssim, l1, mse) of reference_rows(smooth blobs, gaussian 0.2, seed 4, 6 NL-means).
PREVIOUS_REFERENCE_ROWS = [
    ("gaussian:0.2", "noisy", 20, 15.032057960112482, 0.3333787883651046, 0.14385074847765886, 0.03144761920433984),
    ("gaussian:0.2", "tv", 20, 23.851792352221757, 0.753856331820948, 0.04688030449841689, 0.004195467096967653),
    ("gaussian:0.2", "nl_means", 6, 24.355245788839756, 0.8439522235942452, 0.04794087114364461, 0.003694146726993107),
    ("gaussian:0.1", "noisy", 20, 20.130105084030518, 0.5600921064697243, 0.07987101777883557, 0.009717274798996247),
    ("gaussian:0.1", "tv", 20, 28.26073240707405, 0.8755025636793018, 0.029165334205996866, 0.0015064862335572794),
    ("gaussian:0.1", "nl_means", 6, 29.526759625699754, 0.942131955211403, 0.02528747390196831, 0.0011478337871075495),
    ("gaussian:0.3", "noisy", 20, 12.260378841290322, 0.22330974680557106, 0.19552741062232398, 0.05954783151923506),
    ("gaussian:0.3", "tv", 20, 20.72861322745181, 0.6411130043599207, 0.06787190870899293, 0.008542506762933067),
    ("gaussian:0.3", "nl_means", 6, 21.409621914403555, 0.7585982786165975, 0.07043280448609342, 0.007365502565305109),
    ("gaussian:0.5", "noisy", 20, 9.291564421642551, 0.11837272301267462, 0.27424021016017325, 0.1179513278594492),
    ("gaussian:0.5", "tv", 20, 17.37507164339689, 0.5176878595468251, 0.10842135081507473, 0.018667444021831063),
    ("gaussian:0.5", "nl_means", 6, 18.246987845627668, 0.5922312072868924, 0.10446469810429133, 0.015212440813572342),
]


def blobs(count: int, side: int = 24) -> np.ndarray:
    rng = np.random.default_rng(3)
    grid = np.linspace(-1, 1, side)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    images = []
    for _ in range(count):
        cy, cx, radius = rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.3, 0.7)
        images.append(0.15 + 0.7 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / radius**2))
    return np.asarray(images, dtype=np.float32)[..., np.newaxis]


@pytest.mark.parametrize("shape", list(PREVIOUS_SSIM))
def test_ssim_equals_the_previous_vectorized_implementation(shape: tuple[int, int, int, int]) -> None:
    rng = np.random.default_rng(SSIM_SEEDS[shape])
    clean = rng.random(shape)
    noisy = np.clip(clean + 0.2 * rng.standard_normal(shape), 0, 1)
    np.testing.assert_allclose(metrics.ssim_per_image(clean, noisy), PREVIOUS_SSIM[shape], rtol=0, atol=1e-12)


def test_tv_equals_the_previous_batched_chambolle() -> None:
    rng = np.random.default_rng(21)
    gray = add_noise(rng.random((5, 12, 10, 1)).astype(np.float32), NoiseSpec(type="gaussian", level=0.2), seed=1)
    color = add_noise(rng.random((3, 9, 11, 3)).astype(np.float32), NoiseSpec(type="gaussian", level=0.4), seed=2)
    for name, noisy in (("gray", gray), ("color", color)):
        denoised = baselines.denoise_tv_batch(noisy)
        means, first = PREVIOUS_TV[name]
        np.testing.assert_allclose(denoised.mean(axis=(1, 2, 3)), means, rtol=0, atol=1e-7)
        np.testing.assert_allclose(denoised.reshape(len(denoised), -1)[:, :6], first, rtol=0, atol=1e-6)


def test_reference_rows_equal_the_previous_numbers() -> None:
    rows = report.reference_rows(blobs(20), NoiseSpec(type="gaussian", level=0.2), seed=4, nl_means_images=6)
    assert [(row.noise, row.method, row.images) for row in rows] == [row[:3] for row in PREVIOUS_REFERENCE_ROWS]
    for row, (*_, psnr, ssim, l1, mse) in zip(rows, PREVIOUS_REFERENCE_ROWS, strict=True):
        assert (row.psnr, row.ssim, row.l1, row.mse) == pytest.approx((psnr, ssim, l1, mse), rel=1e-6, abs=1e-9)
