"""Data: real datasets read offline, and the multi-view augmentation loaders."""

from .datasets import (
    ArrayDataset,
    CorruptImageError,
    DatasetError,
    ImageFolder,
    load_dataset,
    load_fashion_mnist,
    load_fashion_mnist_sample,
    load_mnist,
)

__all__ = [
    "ArrayDataset",
    "CorruptImageError",
    "DatasetError",
    "ImageFolder",
    "load_dataset",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "load_mnist",
]
