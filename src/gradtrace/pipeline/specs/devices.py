"""The options of the stages that run a model: `--device auto|cpu|cuda` and `--dtype float32|bfloat16`
(`gradtrace.pipeline.devices` resolves them)."""
from __future__ import annotations

from gradtrace.choices import DEVICES, PRECISIONS
from gradtrace.pipeline.spec import option


def device_option():
    return option("auto", "where to compute: auto (a GPU when present, else the CPU), cpu or cuda", choices=DEVICES)


def dtype_option():
    return option("float32", "compute precision of the model's forward and backward: float32, or bfloat16 (faster "
                  "where the hardware has it; about three significant digits)", choices=PRECISIONS)
