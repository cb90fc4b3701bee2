"""The sample stage's spec: what to generate from a checkpoint, and how."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gradtrace.choices import DEFAULT_GUIDANCE
from gradtrace.errors import UserError
from gradtrace.pipeline.spec import Spec, option, positive
from gradtrace.pipeline.specs.devices import device_option, dtype_option

SAMPLERS = ("ddim", "ddpm")
DEFAULT_NUM = 16


def read_prompts(path) -> list[str]:
    """The non-empty lines of a prompt file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}; write one prompt per line")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise UserError(f"prompt file {path} is empty; write one prompt per line")
    return lines


def parse_attrs(pairs: list[str]) -> dict[str, str]:
    """["name=value", ...] → {name: value}."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--attr '{pair}' is not NAME=VALUE; write e.g. --attr style=stripes")
        name, value = pair.split("=", 1)
        out[name.strip()] = value.strip()
    return out


@dataclass
class SampleSpec(Spec):
    checkpoint: str = option(None, "checkpoint directory", required=True)
    out: str = option(None, "samples directory", required=True)
    num: int | None = option(None, "number of images (default: 16, or one per line of --prompts)", type=int,
                             check=positive)
    attr: list = option([], "set one attribute token (repeatable); unset attributes use the null token",
                        append=True, metavar="NAME=VALUE")
    codes: object = option(None, "conditioning codes per image (num, A), from Python", cli=False)
    texts: list | None = option(None, "the prompt of each image, from Python", cli=False)
    prompt: str | None = option(None, "text-to-image models: the prompt of every image", type=str)
    prompts: str | None = option(None, "text-to-image models: a file with one prompt per line (one image each)",
                                 type=str)
    guidance: float = option(DEFAULT_GUIDANCE, "classifier-free guidance scale (1 = off; the same default as "
                                               "learn-weights --generate's learning queries)")
    sampler: str = option("ddim", "sampler", choices=SAMPLERS)
    sample_steps: int = option(50, "sampling steps", check=positive)
    eta: float = option(1.0, "DDIM noise level in [0, 1] (0 = deterministic DDIM)")
    seed: int = option(0, "sampling seed")
    device: str = device_option()
    dtype: str = dtype_option()

    def validate(self) -> None:
        parse_attrs(self.attr)
        if self.prompt is not None and self.prompts is not None:
            raise UserError("pass either --prompt TEXT or --prompts FILE, not both")
        if self.prompt is not None and not self.prompt.strip():
            raise UserError("--prompt is empty; write the text the images should show")

    def prompt_list(self) -> list[str] | None:
        """The prompt of each image (None: the model is not prompted)."""
        if self.texts is not None:
            return [str(t) for t in self.texts]
        if self.prompts is not None:
            lines = read_prompts(self.prompts)
            path = self.prompts
            if self.num is not None and self.num != len(lines):
                raise UserError(f"--num {self.num} but {path} has {len(lines)} prompts; drop --num (one image per "
                                "prompt)")
            return lines
        if self.prompt is not None:
            return [self.prompt.strip()] * self.count()
        return None

    def count(self) -> int:
        return DEFAULT_NUM if self.num is None else self.num
