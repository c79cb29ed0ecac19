"""Evaluation of a trained denoiser: image-quality metrics, classical baselines, the evaluation table.

Modules: metrics (PSNR, SSIM via scikit-image, L1, MSE; kernel and activation sparsity), baselines (TV, NL-means
through scikit-image; BM3D when the optional package is installed), report (the evaluation table of the model card
and its text form), helper (the model-independent rows computed in a helper process, `python -m
dae.evaluation.helper`; import it explicitly: it is not re-exported here, so running it as a module imports it once).
TensorFlow-free except metrics.sparsity_report and report.keras_predictor, which take a Keras model.
"""

from dae.evaluation.baselines import (
    NL_MEANS_H_PER_SIGMA,
    TV_WEIGHT_PER_SIGMA,
    denoise_bm3d_batch,
    denoise_nl_means_batch,
    denoise_tv_batch,
    estimate_noise_sigma,
    estimate_noise_sigmas,
)
from dae.evaluation.metrics import (
    NEAR_ZERO,
    PSNR_CAP_DB,
    image_quality,
    l1_per_image,
    layer_sparsity,
    mse_per_image,
    psnr_per_image,
    sparsity_report,
    ssim_per_image,
)
from dae.evaluation.report import (
    MAX_EVAL_IMAGES,
    MAX_EVAL_PIXELS,
    MAX_NL_MEANS_IMAGES,
    MAX_TV_IMAGES,
    STANDARD_SWEEP_LEVELS,
    Predictor,
    evaluate_denoiser,
    evaluation_noises,
    format_evaluation,
    keras_predictor,
    noise_label,
    reference_rows,
    select_test_images,
    training_levels,
)

__all__ = [
    "MAX_EVAL_IMAGES",
    "MAX_EVAL_PIXELS",
    "MAX_NL_MEANS_IMAGES",
    "MAX_TV_IMAGES",
    "NEAR_ZERO",
    "NL_MEANS_H_PER_SIGMA",
    "PSNR_CAP_DB",
    "STANDARD_SWEEP_LEVELS",
    "TV_WEIGHT_PER_SIGMA",
    "Predictor",
    "denoise_bm3d_batch",
    "denoise_nl_means_batch",
    "denoise_tv_batch",
    "estimate_noise_sigma",
    "estimate_noise_sigmas",
    "evaluate_denoiser",
    "evaluation_noises",
    "format_evaluation",
    "image_quality",
    "keras_predictor",
    "l1_per_image",
    "layer_sparsity",
    "mse_per_image",
    "noise_label",
    "psnr_per_image",
    "reference_rows",
    "select_test_images",
    "sparsity_report",
    "ssim_per_image",
    "training_levels",
]
