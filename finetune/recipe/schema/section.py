"""What every recipe section shares: unknown keys are errors, values are frozen."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

DType = Literal["auto", "bfloat16", "float16", "float32"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
