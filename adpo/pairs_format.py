"""The preference-pairs dataset format: its schema and version, and the one way to open and validate one. ``adpo pairs``
writes it; AdPO's trainer reads it (its columns, its reference log-probs)."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from datasets import Features, Image, Value

from adpo.errors import UsageError

#: bumped when a column changes meaning; a dataset stores it in its info (``dataset_info.json``)
FORMAT_VERSION = datasets.Version("1.0.0")
DATASET_DIR = "dataset"  # inside an `adpo pairs` run directory
RUN_MANIFEST = "run.json"

#: the columns of every pair, in order; the reference log-probs are added when computed
FEATURES = Features(
    {
        "image": Image(),  # the clean image exactly as the attack saw it (processor's resize/crop), PNG
        "adv_image": Image(),  # the stored adversarial image (uint8 grid, inside the ε-ball of `image`), PNG
        "prompt": Value("string"),
        "chosen": Value("string"),  # y_w: the original model's answer on `image`
        "rejected": Value("string"),  # y_l: its answer on `adv_image`
        "answers_differ": Value("bool"),
        "source_id": Value("string"),
        "item_index": Value("int64"),  # position in the run's plan (image-major, then prompt)
        "prompt_index": Value("int32"),  # index of the prompt in the run's prompt list
        "norm": Value("string"),
        "eps": Value("float64"),
        "steps": Value("int32"),
        "step_size": Value("float64"),
        "random_start": Value("bool"),
        "embedding": Value("string"),  # which tower output the FARE objective compared
        "embedding_distance": Value("float32"),  # ||φ(adv_image) − φ_orig(image)||², on the stored images
        "seed": Value("int64"),
        "model_id": Value("string"),
        "decoding": Value("string"),  # JSON of the generate() settings
    }
)
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_LOGP_FEATURES = {name: Value("float64") for name in REF_COLUMNS}
#: what training on pairs reads (any dataset with these columns is a pairs dataset, e.g. one made elsewhere)
REQUIRED_COLUMNS = ("image", "adv_image", "prompt", "chosen", "rejected")


def features_for(compute_ref_logps: bool) -> Features:
    """The schema of a run, with the reference log-prob columns when they are computed."""
    if not compute_ref_logps:
        return FEATURES
    return Features({**FEATURES, **REF_LOGP_FEATURES})


def stamp(dataset: datasets.Dataset) -> datasets.Dataset:
    """``dataset`` marked with this format's version (kept by ``save_to_disk``)."""
    dataset.info.version = FORMAT_VERSION
    return dataset


def missing_columns(columns: list[str] | None) -> list[str]:
    """The required columns a dataset with ``columns`` lacks (none when its columns are unknown)."""
    return [] if columns is None else [name for name in REQUIRED_COLUMNS if name not in columns]


def check_pairs(dataset: datasets.Dataset, name: str) -> None:
    """Refuse a dataset that is no pairs dataset, or one written in a newer format, naming what is wrong."""
    columns = getattr(dataset, "column_names", None)
    if columns is None:
        raise UsageError(f"{name} must be a datasets.Dataset of pairs, got {type(dataset).__name__}")
    missing = missing_columns(columns)
    if missing:
        raise UsageError(f"{name} lacks columns {missing} (has {columns}); a pairs dataset needs {list(REQUIRED_COLUMNS)}: "
                         "make one with `adpo pairs --config configs/pairs/<name>.yaml`")
    version = dataset.info.version
    if version is not None and datasets.Version(str(version)).major > FORMAT_VERSION.major:
        raise UsageError(f"{name} is a pairs dataset of format {version}, newer than this adpo reads ({FORMAT_VERSION}); "
                         "upgrade adpo")


def load_pairs(path: str | os.PathLike, split: str = "train") -> datasets.Dataset:
    """A pairs dataset from an ``adpo pairs`` run directory (its ``dataset/``), a ``save_to_disk`` directory or a hub id,
    checked by :func:`check_pairs`."""
    location = Path(path).expanduser()
    if location.exists():
        if (location / DATASET_DIR).is_dir():
            location = location / DATASET_DIR
        elif (location / RUN_MANIFEST).is_file():
            raise UsageError(f"{path} holds an unfinished pairs run (no {DATASET_DIR}/ yet); run the same `adpo pairs` "
                             "command again")
        dataset = datasets.load_from_disk(str(location))
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise UsageError(f"{path!r} has splits {list(dataset)}, not {split!r}; set the split to one of them")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(os.fspath(path), split=split)
    check_pairs(dataset, os.fspath(path))
    return dataset
