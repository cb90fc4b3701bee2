"""Adapter for Stable-Diffusion-layout text-to-image pipelines saved by diffusers (optionally with LoRA)."""
import diffusers
import transformers

# Loading a pipeline is one step of a gradtrace stage: the libraries' own progress bars and advice (e.g.
# "install torchvision") would drown the stage's one line of output.
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
