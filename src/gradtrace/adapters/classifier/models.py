"""Build a classifier from its model config: the small ResNet, the small ViT, or any `nn.Module` a user's
function returns (the `factory` kind).

    {"arch": "factory", "factory": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}, ...}

imports `torchvision.models.resnet18` in the user's environment and calls it with the kwargs; any module whose
forward maps images (B, C, H, W) in [-1, 1] to logits (B, num_classes) works (checked on a probe batch when the
config is made). Initialisation is seeded inside a forked RNG, so the global torch RNG is never touched and the
same seed gives the same weights. Every model carries its config as `.config`.
"""
from __future__ import annotations

import copy
from importlib import import_module
from typing import Callable

import torch
from torch import nn

from gradtrace.adapters.classifier.configs import check_model_config
from gradtrace.adapters.classifier.resnet import ResNet
from gradtrace.adapters.classifier.vit import VisionTransformer
from gradtrace.errors import UserError

ARCHS: dict[str, Callable[[dict], nn.Module]] = {"resnet": ResNet, "vit": VisionTransformer}


def import_factory(target: str) -> Callable[..., nn.Module]:
    """The callable named "package.module:function" (dots after the colon reach attributes)."""
    module_name, _, attr = str(target).partition(":")
    try:
        obj = import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot import the model factory {target!r} ({first}); install its package or fix the "
                        "\"package.module:function\" path") from None
    if not callable(obj):
        raise UserError(f"model factory {target!r} is not callable; name a function or class that returns an "
                        "nn.Module")
    return obj


def build_factory(config: dict) -> nn.Module:
    """The user's module: `factory(**kwargs)`, carrying `config`."""
    fn = import_factory(config["factory"])
    try:
        model = fn(**config["kwargs"])
    except (TypeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise UserError(f"model factory {config['factory']!r} failed with kwargs {config['kwargs']} ({first}); "
                        "fix the kwargs in --model-options") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {config['factory']!r} returned a {type(model).__name__}, not an nn.Module")
    if getattr(model, "config", None) is not None and not isinstance(model.config, dict):
        raise UserError(f"the module from {config['factory']!r} has its own .config attribute; wrap it in an "
                        "nn.Module without one (gradtrace keeps the model config there)")
    model.config = copy.deepcopy(config)
    model.train_ids = None
    model.train_log = None
    return model


def build_model(model_config: dict, seed: int = 0) -> nn.Module:
    """A classifier for `model_config`, parameters initialised from `seed` (the global RNG is left untouched)."""
    check_model_config(model_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if model_config["arch"] == "factory":
            return build_factory(model_config)
        return ARCHS[model_config["arch"]](model_config)


@torch.no_grad()
def check_logits(model: nn.Module, config: dict) -> None:
    """Refuse a model whose forward does not map a probe batch (2, C, H, W) to logits (2, num_classes)."""
    x = torch.zeros(2, config["channels"], config["size"], config["size"])
    model.eval()
    try:
        out = model(x)
    except Exception as exc:  # a user's model may raise anything on a wrong input shape
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the classifier cannot take images of shape {tuple(x.shape[1:])} ({first}); fix its "
                        "kwargs or pass images of the size it takes (--size)") from None
    want = (2, int(config["num_classes"]))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the classifier returns {got} for a batch of 2 images, not logits {want} (one per class "
                        f"of {config['label']!r}); set its number of classes to {want[1]} or wrap it so forward "
                        "returns logits")
