"""The scoring server's JSON answers, declared once: the server builds them, the edge client checks every
answer it receives against them.

A broken or hostile server must not be able to crash the client (a missing field, ``input_size: "abc"``),
make it allocate without bound (``input_size: 10**9``, a huge map) or have a failed frame recorded as
"normal" (a NaN score): types are strict (no "64" for 64), numbers finite and in range, names known or
of bounded length and printable, maps of the size they declare.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from edgead.edge.codecs import CODECS
from edgead.edge.payload import MAX_ELEMENTS, MAX_SIDE
from edgead.runs import MAX_IMAGE_SIZE, ImageSize

MAP_SIDE = 64  # the optional anomaly map is sent as a 64 x 64 grey PNG (about 2 kB)...
MapFormat = Literal["png", "float16"]  # ...or at full input resolution as float16, for pixel metrics
MAX_MAP_PNG_CHARS = 64 * 1024  # base64 of a 64 x 64 grey PNG: about 3 kB, 6 kB if incompressible
MAX_MAP_FLOAT16_CHARS = 4 * math.ceil(MAX_IMAGE_SIZE * MAX_IMAGE_SIZE * 2 / 3)  # 2048 x 2048 float16: 11 MB
MAX_MODELS = 1024
MAX_NAME = 128

CodecName = Literal["image", "webp", "features", "rs", "pq", "rs+pq", "rs+webp"]
assert get_args(CodecName) == CODECS, "CodecName must list edgead.edge.codecs.CODECS"
AnswerCodec = Literal[CodecName, "png", "jpeg"]  # what was decoded: a codec, or the image file's format


def is_model_name(name: str) -> bool:
    """Letters, digits, '-', '_' and '.': the names `edgead serve` accepts for its runs."""
    return 0 < len(name) <= MAX_NAME and all(ch.isalnum() or ch in "-_." for ch in name)


def _model_name(value: str) -> str:
    if not is_model_name(value):
        raise ValueError(f"model name {value[:40]!r} must be 1..{MAX_NAME} letters, digits, '-', '_' or '.'")
    return value


ModelName = Annotated[str, AfterValidator(_model_name)]
Text = Annotated[str, Field(max_length=MAX_NAME, pattern=r"^[\x20-\x7e]*$")]  # printable ASCII, bounded
Finite = Annotated[float, Field(allow_inf_nan=False)]
Millis = Annotated[float, Field(ge=0, le=1e7, allow_inf_nan=False)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
MapSide = Annotated[int, Field(ge=1, le=MAX_IMAGE_SIZE)]


class Answer(BaseModel):
    """Strict types (JSON 64 is an int, "64" is not); unknown fields are ignored (newer servers may add some)."""

    model_config = ConfigDict(strict=True, protected_namespaces=())


class Health(Answer):
    status: Literal["ok"]
    models: list[ModelName] = Field(max_length=MAX_MODELS)


class ModelInfo(Answer):
    name: ModelName
    model: Text
    backbone: Text
    input_size: ImageSize
    feature_shape: list[Side] = Field(min_length=3, max_length=3)
    accepted_codecs: list[CodecName] = Field(min_length=1, max_length=len(CODECS))
    pq_codebook_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")] | None
    threshold: Finite

    @model_validator(mode="after")
    def _features_fit_the_input(self) -> ModelInfo:
        channels, height, width = self.feature_shape
        if channels * height * width > MAX_ELEMENTS or height > self.input_size or width > self.input_size:
            raise ValueError(f"feature_shape {self.feature_shape} does not fit a {self.input_size} px input "
                             f"(at most {MAX_ELEMENTS:,} values, sides at most the input size)")
        return self


class ModelList(Answer):
    models: list[ModelInfo] = Field(max_length=MAX_MODELS)


class Timings(Answer):
    decode_ms: Millis
    backbone_ms: Millis
    head_ms: Millis
    total_ms: Millis


class ScoreAnswer(Answer):
    model: ModelName
    codec: AnswerCodec
    payload_bytes: int = Field(ge=0, le=2**40)
    score: Finite
    normalized_score: float = Field(ge=0, le=1, allow_inf_nan=False)
    decision: Literal["normal", "anomalous"]
    timings: Timings
    anomaly_map_png: str | None = Field(
        None, max_length=MAX_MAP_PNG_CHARS, description=f"base64 PNG, {MAP_SIDE}x{MAP_SIDE}, 0.5 grey = threshold")
    anomaly_map_float16: str | None = Field(
        None, max_length=MAX_MAP_FLOAT16_CHARS,
        description="base64 of the raw map (the score's scale) as little-endian float16, row-major, "
        "anomaly_map_shape pixels (the model's input size)")
    anomaly_map_shape: list[MapSide] | None = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _map_matches_its_shape(self) -> ScoreAnswer:
        if (self.anomaly_map_float16 is None) != (self.anomaly_map_shape is None):
            raise ValueError("anomaly_map_float16 and anomaly_map_shape come together or not at all")
        if self.anomaly_map_float16 is not None and self.anomaly_map_shape is not None:
            height, width = self.anomaly_map_shape
            expected = 4 * math.ceil(height * width * 2 / 3)
            if len(self.anomaly_map_float16) != expected:
                raise ValueError(f"anomaly_map_float16 holds {len(self.anomaly_map_float16):,} base64 characters, "
                                 f"not the {expected:,} of a {height}x{width} float16 map")
        return self


class ErrorAnswer(BaseModel):
    detail: str
