"""Tiny diffusers UNets (unconditional and attribute-conditioned): configs, model, training, sampling,
measurements, the `block` group preset, and their model adapter (`diffusion-unet`).

Without diffusers (the `diffusers` extra) the package still imports, with its group names (`groups`, which the
report reads) and without the names below; the adapter registry then names the extra."""
try:
    from gradtrace.adapters.diffusion.adapter import TinyUNetAdapter
    from gradtrace.adapters.diffusion.configs import ddpm_cifar10_config, default_model_config, default_scheduler_config
    from gradtrace.adapters.diffusion.measure import MEASUREMENTS, DiffusionObjective, Measurement
    from gradtrace.adapters.diffusion.sample import request_codes, sample
    from gradtrace.adapters.diffusion.train import TrainConfig, train
    from gradtrace.adapters.diffusion.unet import DiffusionModel, build_model, make_scheduler
except ModuleNotFoundError as exc:  # pragma: no cover (tested in a subprocess without diffusers)
    if (exc.name or "").split(".")[0] != "diffusers":
        raise

__all__ = ["DiffusionModel", "DiffusionObjective", "MEASUREMENTS", "Measurement", "TinyUNetAdapter", "TrainConfig",
           "build_model", "ddpm_cifar10_config", "default_model_config", "default_scheduler_config", "make_scheduler",
           "request_codes", "sample", "train"]
