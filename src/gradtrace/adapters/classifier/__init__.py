"""Image classifiers: a small ResNet and ViT named as torchvision's, any user module by import path (the factory
kind), cross-entropy training, the margin and cross-entropy measurements, the `block` group preset, and their
model adapter (`classifier`)."""
from gradtrace.adapters.classifier.adapter import ClassifierAdapter
from gradtrace.adapters.classifier.configs import KINDS, default_model_config, label_of
from gradtrace.adapters.classifier.groups import block_key
from gradtrace.adapters.classifier.models import build_model
from gradtrace.adapters.classifier.objective import MEASUREMENTS, ClassifierObjective, margins, measure
from gradtrace.adapters.classifier.resnet import ResNet
from gradtrace.adapters.classifier.train import TrainConfig, train
from gradtrace.adapters.classifier.vit import SelfAttention, VisionTransformer

__all__ = ["ClassifierAdapter", "ClassifierObjective", "KINDS", "MEASUREMENTS", "ResNet", "SelfAttention",
           "TrainConfig", "VisionTransformer", "block_key", "build_model", "default_model_config", "label_of",
           "margins", "measure", "train"]
