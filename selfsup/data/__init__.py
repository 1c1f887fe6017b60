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
from .loader import Loader, build_loader
from .recipes import RECIPES, Recipe, View, get_recipe

__all__ = [
    "RECIPES",
    "ArrayDataset",
    "CorruptImageError",
    "DatasetError",
    "ImageFolder",
    "load_dataset",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "load_mnist",
    "Loader",
    "Recipe",
    "View",
    "build_loader",
    "get_recipe",
]
