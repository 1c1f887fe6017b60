"""Which labeled images score an encoder: the k-NN monitor's and selfsup.eval's sets.

Scoring needs a labeled *memory* (k-NN) or training set (linear probe), and labeled held-out
*queries*. Given the training data (`data`, perhaps unlabeled), `--test-data` and `--knn-data`:

1. ``--knn-data D``: the memory is D's train split; the queries are `--test-data` if given,
   else D's held-out split (D/val, D/test, or the sibling of a D named .../train), else a
   fixed 20% of D held out from its memory.
2. labeled `data` (a built-in set, or class folders): the memory is `data`'s train split;
   the queries are `--test-data` (the split folder itself, or a folder holding val/ or test/),
   else `data`'s held-out split as in 1.
3. unlabeled `data` with ``--test-data D``: D (labeled) gives both, a fixed 20% as queries.
4. otherwise there is nothing labeled to score with: `score_sets` returns the reason as a
   string, and the trainer says it once and trains without the monitor.

Class indices of the queries follow the memory's class names (a val tree missing a class
would otherwise shift every later label).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .datasets import (
    ArrayDataset,
    DatasetError,
    ImageFolder,
    held_out_candidates,
    held_out_folder,
    is_builtin,
    load_dataset,
    take,
)

QUERY_FRACTION = 0.2  # of a labeled set that has no held-out split of its own
HOW_TO = ("to turn it on, give --knn-data DIR (a labeled tree: class folders, or train/ and "
          "val/ of class folders) or --test-data DIR (a labeled held-out folder)")


@dataclass
class ScoreSets:
    memory: ArrayDataset | ImageFolder  # labeled: the k-NN memory / the probe's training set
    queries: ArrayDataset | ImageFolder  # labeled held-out images
    note: str  # where each came from, one line


def _is_labeled(ds) -> bool:
    return getattr(ds, "labeled", True)


def _held_out(spec: str) -> ArrayDataset | ImageFolder | None:
    """The held-out split that comes with `spec` (a built-in's test split), or None."""
    if is_builtin(spec):
        return load_dataset(spec, "test")
    root = Path(spec)
    folder = held_out_folder(root)
    return None if folder is None else ImageFolder(str(folder))


def _split_off(ds, seed: int) -> tuple:
    """(memory, queries): a fixed QUERY_FRACTION of `ds` held out, by a seeded permutation."""
    n = len(ds)
    if n < 2:
        raise DatasetError(f"{getattr(ds, 'root', ds.name)} has {n} image(s): too few to "
                           "split into a k-NN memory and queries")
    perm = np.random.default_rng([seed, 0x5E7]).permutation(n)
    k = max(1, round(n * QUERY_FRACTION))
    return take(ds, np.sort(perm[k:])), take(ds, np.sort(perm[:k]))


def align_classes(memory, queries):
    """Queries relabeled to the memory's class indices, by class name (folders only)."""
    if not (isinstance(memory, ImageFolder) and isinstance(queries, ImageFolder)) or \
            memory.classes == queries.classes:
        return queries
    index = {c: i for i, c in enumerate(memory.classes)}
    unknown = sorted(set(queries.classes) - set(index))
    if unknown:
        warnings.warn(f"held-out classes not in the memory {memory.root} (scored as misses): "
                      f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}",
                      stacklevel=3)
        for j, c in enumerate(unknown):
            index[c] = len(memory.classes) + j
    out = ImageFolder.__new__(ImageFolder)
    out.__dict__.update(queries.__dict__)
    out.samples = [(p, index[queries.classes[y]]) for p, y in queries.samples]
    out.classes = list(memory.classes) + unknown
    return out


def _need_labels(ds, flag: str, spec) -> None:
    if not _is_labeled(ds):
        raise DatasetError(f"{flag} {spec} has no labels ({ds.why_unlabeled}); it must be "
                           "a tree of class folders")


def _flat_held_out(queries) -> str:
    return (f"k-NN monitor off: the held-out split {queries.root} has no labels "
            f"({queries.why_unlabeled}; ImageNet's raw val/ is such a flat folder: sort it "
            f"into class folders); {HOW_TO}")


def score_sets(data, test_data=None, knn_data=None, *, unlabeled: bool = False,
               seed: int = 0, train=None) -> ScoreSets | str:
    """The labeled memory and queries for scoring (see the module docstring), or the reason
    there are none. `train`: the already loaded training set of `data`, if at hand."""
    data = str(data)
    if knn_data is not None:
        memory = load_dataset(knn_data, "train")
        _need_labels(memory, "--knn-data", knn_data)
        if test_data is not None:
            queries, note = load_dataset(test_data, "test", named=True), f"--test-data {test_data}"
        else:
            queries, note = _held_out(str(knn_data)), "its held-out split"
        if queries is None:
            memory, queries = _split_off(memory, seed)
            note = f"a fixed {QUERY_FRACTION:.0%} of it"
        if test_data is None and not _is_labeled(queries):
            return _flat_held_out(queries)
        _need_labels(queries, "--test-data", test_data)
        return ScoreSets(memory, align_classes(memory, queries),
                         f"k-NN memory --knn-data {knn_data}, queries {note}")
    train = train if train is not None else load_dataset(data, "train", unlabeled=unlabeled)
    if _is_labeled(train):
        if test_data is not None:
            queries, note = load_dataset(test_data, "test", named=True), f"--test-data {test_data}"
        else:
            queries, note = _held_out(data), "its held-out split"
        if queries is None:
            return (f"k-NN monitor off: {data} has no held-out split (looked for "
                    f"{' and '.join(held_out_candidates(Path(data)))}); {HOW_TO}")
        if test_data is None and not _is_labeled(queries):
            return _flat_held_out(queries)
        _need_labels(queries, "--test-data", test_data)
        return ScoreSets(train, align_classes(train, queries),
                         f"k-NN memory {data}, queries {note}")
    if test_data is not None:
        labeled = load_dataset(test_data, "test", named=True)
        _need_labels(labeled, "--test-data", test_data)
        memory, queries = _split_off(labeled, seed)
        return ScoreSets(memory, queries, f"k-NN on --test-data {test_data} ({data} has no "
                                          f"labels): a fixed {QUERY_FRACTION:.0%} as queries")
    return f"k-NN monitor off: {data} has no labels ({train.why_unlabeled}); {HOW_TO}"
