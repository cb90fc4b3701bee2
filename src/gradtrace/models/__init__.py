"""Diffusion models: tiny diffusers configs, a uniform UNet wrapper, training, checkpoints, sampling."""
from gradtrace.models.checkpoint import Checkpoint, is_checkpoint, load_checkpoint, save_checkpoint
from gradtrace.models.configs import default_model_config, default_scheduler_config
from gradtrace.models.sample import encode_attributes, sample
from gradtrace.models.train import TrainConfig, train
from gradtrace.models.unet import (DiffusionModel, build_model, count_parameters, make_scheduler,
                                   model_fingerprint)

__all__ = [
    "Checkpoint", "DiffusionModel", "TrainConfig", "build_model", "count_parameters", "default_model_config",
    "default_scheduler_config", "encode_attributes", "is_checkpoint", "load_checkpoint", "make_scheduler",
    "model_fingerprint", "sample", "save_checkpoint", "train",
]
