"""Data: real datasets read offline, and the multi-view augmentation loaders."""

from .datasets import (
    ArrayDataset,
    CorruptImageError,
    DatasetError,
    ImageFolder,
    ImageTooLargeError,
    load_dataset,
    load_fashion_mnist,
    load_fashion_mnist_sample,
    load_mnist,
)
from .images import BACKGROUND, decode_image, open_image
from .layouts import ScoreSets, score_sets
from .loader import Loader, build_loader
from .recipes import RECIPES, Recipe, View, get_recipe

__all__ = [
    "BACKGROUND",
    "RECIPES",
    "ArrayDataset",
    "CorruptImageError",
    "DatasetError",
    "ImageFolder",
    "ImageTooLargeError",
    "ScoreSets",
    "decode_image",
    "load_dataset",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "load_mnist",
    "Loader",
    "Recipe",
    "View",
    "build_loader",
    "get_recipe",
    "open_image",
    "score_sets",
]
