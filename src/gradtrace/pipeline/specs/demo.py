"""The demo's spec."""
from __future__ import annotations

from dataclasses import dataclass

from gradtrace.pipeline.spec import Spec, option


@dataclass
class DemoSpec(Spec):
    out: str = option("demo_out", "output directory")
    quick: bool = option(False, "tiny settings (about a minute)")
    text_to_image: bool = option(False, "the text-to-image path instead: a small SD-layout pipeline, LoRA, prompts")
