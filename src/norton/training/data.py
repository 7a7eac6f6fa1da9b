"""Transitional: the names ``norton.training.data`` used to define, now in
:mod:`norton.training.datasets`, :mod:`norton.training.readers`, :mod:`norton.training.transforms`
and :mod:`norton.training.loaders`. Import from those; this module goes once no caller uses it.
"""
from __future__ import annotations

from norton.training.datasets import DATASETS, DataSplits, TensorImageDataset, build_datasets, synthetic_images
from norton.training.loaders import Loaders, ShardSampler, build_loaders
from norton.training.readers import DEBIAN_FASHION_MNIST, find_fashion_mnist, read_idx
from norton.training.transforms import build_transforms

__all__ = ["DATASETS", "DEBIAN_FASHION_MNIST", "DataSplits", "Loaders", "ShardSampler", "TensorImageDataset",
           "build_datasets", "build_loaders", "build_transforms", "find_fashion_mnist", "read_idx",
           "synthetic_images"]
