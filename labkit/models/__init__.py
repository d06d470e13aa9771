"""Models used by the labs: ``AlzheimerCNN`` (labs 01, 02), ``resnet`` (lab 03), ``ViT`` (lab 04)."""
from labkit.models.cnn import AlzheimerCNN
from labkit.models.resnet import resnet
from labkit.models.summary import count_parameters, model_summary

__all__ = ["AlzheimerCNN", "count_parameters", "model_summary", "resnet"]
