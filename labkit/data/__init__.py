"""Datasets: the real folder layouts, synthetic stand-ins written in those layouts, cached tensors.

``load_alzheimer`` (labs 01, 02), ``load_imagenet`` (lab 03) and ``load_lung`` (lab 04) each return an
:class:`ImageData`; ``batch_transform`` augments and normalises uint8 batches on their device.
"""
from labkit.data.alzheimer import load_alzheimer
from labkit.data.augment import BatchAugment, batch_transform
from labkit.data.images import ImageData, ImageSplit
from labkit.data.imagenet import load_imagenet
from labkit.data.synth_mri import write_alzheimer_standin

__all__ = ["BatchAugment", "ImageData", "ImageSplit", "batch_transform", "load_alzheimer", "load_imagenet",
           "write_alzheimer_standin"]
