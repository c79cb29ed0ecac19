"""The request and response models of POST /reconstruct (JSON body, multipart form, query, answer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dae.spec import NoiseSpec, TrainedNoise

# The first scikit-learn digit (a "0", 8x8 gray) as base64 PNG: works with any model trained on `digits`
# (the POST /jobs example), so the Swagger examples can be pressed in order.
EXAMPLE_PNG_8X8 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAARklEQVR42gXBYRVAMBgAwHt7/vsiaGCaLIJGIqyCBp4EI4E1III7lLYFaG99i0G"
    "elh55T+LqbpI4GUm+WeQP01PqAdZW8QOg+BHx1aT2vAAAAABJRU5ErkJggg=="
)


class RawArray(BaseModel):
    """Pixels as one base64 buffer: the compact alternative to nested lists (no per-number JSON parsing)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="base64 of the pixel values, row-major, little-endian.")
    shape: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        min_length=2, max_length=4, description="(H, W), (H, W, C) or a batch (N, H, W, C); C in {1, 3, 4}."
    )
    dtype: Literal["float32", "uint8"] = Field("float32", description="float32 in [0, 1] or uint8 in 0-255.")


class ImageSources(BaseModel):
    """The three ways to send pixels."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="base64 PNG or JPEG (a `data:image/png;base64,` URL is fine).")
    pixels: list[Any] | None = Field(None, description="H×W or H×W×C nested lists of numbers in [0, 1].")
    array: RawArray | None = Field(None, description="A base64 float32/uint8 buffer with its shape.")

    def given_sources(self) -> list[str]:
        """Names of the sources that are set."""
        return [name for name in ("image", "pixels", "array") if getattr(self, name) is not None]


class ImageInput(ImageSources):
    """One image (or, for a 4-D `array`, a batch): exactly one of `image`, `pixels`, `array`."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ImageInput:
        given = self.given_sources()
        if len(given) != 1:
            raise ValueError(
                f"An image needs exactly one source. Expected one of image, pixels, array. Received: {given or 'none'}"
            )
        return self


class AddNoise(NoiseSpec):
    """Corrupt the input before denoising (seeded, same formulas as training)."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the noise draw; image i uses (seed, i).")


#: The noise types, as NoiseSpec defines them (the form documents the same enum).
NoiseType = NoiseSpec.model_fields["type"].annotation


class ReconstructForm(BaseModel):
    """A /reconstruct call as a multipart form: one image file, optionally a clean reference and noise."""

    model: str = Field(description="Model id, name or name:version.", examples=["digits-demo"])
    file: bytes = Field(description="A PNG or JPEG image.")
    clean: bytes | None = Field(None, description="Optional clean reference.")
    noise_type: NoiseType | None = Field(None, description="Optional: corrupt the image first.")  # type: ignore[valid-type]
    noise_level: float = Field(0.2, description="Noise level (default 0.2).")
    noise_seed: int = Field(0, description="Noise seed (default 0).")


class ReconstructRequest(ImageSources):
    """A /reconstruct call: the model and one image (`image` | `pixels` | `array`) or a batch (`images`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "digits-demo", "image": EXAMPLE_PNG_8X8},
                {"model": "digits-demo", "image": EXAMPLE_PNG_8X8, "add_noise": {"type": "gaussian", "level": 0.2, "seed": 1},
                 "clean": {"image": EXAMPLE_PNG_8X8}},
                {"model": "digits-demo", "images": [{"image": EXAMPLE_PNG_8X8}, {"pixels": [[0.5] * 8] * 8}]},
            ]
        },
    )

    model: str = Field(max_length=200, description="Model id, name (latest version) or name:version.")
    images: list[ImageInput] | None = Field(None, min_length=1, description="A batch of images.")
    clean: ImageInput | list[ImageInput] | None = Field(
        None, description="Clean reference(s), as many images as the input, in order: adds error/PSNR/SSIM vs clean."
    )
    add_noise: AddNoise | None = Field(None, description="Corrupt the input first (to try a model on a clean image).")

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> ReconstructRequest:
        single = self.given_sources()
        if self.images is not None and single:
            raise ValueError(f"Send one image or a batch, not both. Expected `images` alone. Received: images and {single}")
        if self.images is None and len(single) != 1:
            raise ValueError(
                "Nothing to reconstruct. Expected exactly one of image, pixels, array (one image) or images (a batch). "
                f"Received: {single or 'none'}"
            )
        return self

    def to_call(self, body_bytes: int) -> ParsedCall:
        """The call with its inputs and references as lists, in order."""
        # One image: the request itself holds its source (image | pixels | array), as an ImageInput would.
        inputs: list[ImageSources | bytes] = list(self.images) if self.images is not None else [self]
        clean: list[ImageSources | bytes] | None = None
        if self.clean is not None:
            clean = list(self.clean) if isinstance(self.clean, list) else [self.clean]
        return ParsedCall(model=self.model, inputs=inputs, clean=clean, add_noise=self.add_noise,
                          body_bytes=body_bytes)


@dataclass
class ParsedCall:
    """A /reconstruct call from either body type: sources are ImageInput objects or uploaded file bytes."""

    model: str
    inputs: list[ImageSources | bytes]
    clean: list[ImageSources | bytes] | None
    add_noise: AddNoise | None
    body_bytes: int  # the body's size as read (chunked bodies included)


class ErrorStats(BaseModel):
    """Summary of an L1 error map."""

    mean: float
    max: float
    p99: float = Field(description="99th percentile.")


class CleanComparison(BaseModel):
    """The denoised image (and the input) against the clean reference."""

    psnr: float = Field(description="dB, data range 1, capped at 100.")
    ssim: float | None = Field(description="None for images under 3x3 pixels.")
    input_psnr: float = Field(description="PSNR of the input the model saw (after noise): the gain is psnr − input_psnr.")
    input_ssim: float | None
    error_stats: ErrorStats = Field(description="Of |clean − denoised| (mean over channels).")
    error_map: list[list[float]] | None = Field(None, description="|clean − denoised|, with error_format=json.")
    error_map_f32: str | None = Field(None, description="With error_format=f32.")
    error_map_png: str | None = Field(None, description="With error_format=png.")


class ReconstructedImage(BaseModel):
    """One denoised image, its error map and statistics. Fields appear according to format/error_format/heatmap."""

    shape: list[int] = Field(description="(H, W, C) of the denoised image (C = the model's channels).")
    denoised_png: str | None = Field(None, description="base64 PNG (format=png or array).")
    denoised: list[Any] | None = Field(None, description="H×W×C floats in [0, 1] (format=array).")
    denoised_f32: str | None = Field(None, description="base64 little-endian float32 H×W×C (format=f32).")
    noisy_png: str | None = Field(None, description="With add_noise: the corrupted input the model saw, base64 PNG.")
    error_map: list[list[float]] | None = Field(None, description="|input − denoised|, H×W (error_format=json).")
    error_map_f32: str | None = Field(None, description="The error map as base64 float32 H×W (error_format=f32).")
    error_map_png: str | None = Field(None, description="The error map as 8-bit gray PNG, 255 = 1.0 (error_format=png).")
    error_heatmap_png: str | None = Field(
        None, description="The error map in the inferno colormap, black = 0, yellow-white = this image's max error."
    )
    error_stats: ErrorStats
    clean: CleanComparison | None = None


class ModelSummary(BaseModel):
    """Which model answered, and the noise it was trained for (a blind model: any level in its range)."""

    id: str
    name: str
    version: int
    trained_noise: TrainedNoise


class ReconstructResponse(BaseModel):
    """Results in input order."""

    model: ModelSummary
    results: list[ReconstructedImage]
    mean_error: float = Field(description="Mean L1 error over all images.")


OutputFormat = Literal["png", "array", "f32"]
ErrorFormat = Literal["json", "f32", "png", "none"]


@dataclass(frozen=True, slots=True)
class AnswerOptions:
    """What the answer holds: the query parameters of POST /reconstruct, validated by the route's signature."""

    format: OutputFormat = "png"
    error_format: ErrorFormat = "json"
    heatmap: bool = True


