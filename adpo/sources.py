"""Image sources shared by every stage: an image folder, a Hugging Face dataset, a COCO-style
annotation file, or a plugin's data (the bundled world's, through :mod:`adpo.plugins`).

A source is an indexable sequence of :class:`ImageRecord` with stable ``source_id`` strings, so that
work can be split across processes by index and resumed. Reading an image never raises: a corrupt or
missing file yields a record with ``image=None`` and ``error`` saying why, for the caller to skip and
report. Files a folder source cannot list (empty, or named in bytes that are not UTF-8) are left out
when it opens, with a warning, and kept in ``source.skipped``. Image paths a source reads from its data
(COCO ``file_name``, a saved dataset's path-only rows, a folder's symlinks) must stay inside the source's
root: one that leads outside is refused when the source opens, unless ``allow_outside_root``.
:func:`check_source` refuses, before any model loads, a spec no source could open.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from adpo.plugins import data_plugin
from adpo.preprocess import ImageLoadError, load_rgb

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


@dataclass
class ImageRecord:
    source_id: str
    image: Image.Image | None
    label: int | None = None
    captions: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    answers: list[str | list[str]] = field(default_factory=list)  # per question: one answer or its references
    error: str | None = None


class ImageSource(Sequence[ImageRecord]):
    """Base class: subclasses implement ``__len__`` and ``_record(i)``; ``class_names`` when labelled."""

    class_names: list[str] | None = None
    name: str = "source"
    # files left out when the source opened: ``{"source_id", "reason"}``, as a pairs card lists skipped images
    skipped: Sequence[dict[str, str]] = ()

    def __getitem__(self, index: int) -> ImageRecord:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("sources are indexed one record at a time")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} with {len(self)} images")
        return self._record(index)

    def _record(self, index: int) -> ImageRecord:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def source_id(self, index: int) -> str:
        """The stable id of record ``index``; subclasses answer without decoding the image."""
        return self[index].source_id

    def question_counts(self) -> list[int] | None:
        """How many questions each record holds, read without decoding any image; None for a source without any."""
        return None


ALLOW_OUTSIDE_ROOT_HELP = ("Read image paths that lead outside their root (a COCO file_name outside image_root, a saved "
                           "dataset's path outside its folder, a folder's symlink out of it); refused by default.")


@dataclass
class ImageSourceArguments:
    """How a stage reads the images of its source (:func:`open_source`): the keys every stage that makes its own image
    data shares (``adpo pairs``, AdPO's online pairs), beside its own key naming the source. A stage's config inherits
    them, as it inherits :class:`adpo.threat.ThreatArguments`."""

    image_column: str = field(default="image", metadata={"help": "HF dataset: column holding the images."})
    image_root: str | None = field(default=None, metadata={"help": "COCO: directory of the image files (default: beside the json)."})
    allow_outside_root: bool = field(default=False, metadata={"help": ALLOW_OUTSIDE_ROOT_HELP})
    max_images: int | None = field(default=None, metadata={"help": "Use only the first N images of the source."})

    def image_source_problems(self) -> list[str]:
        """What is wrong with these keys, one line each with the fix, checked without reading any image."""
        problems = []
        if self.image_root and not Path(self.image_root).expanduser().is_dir():
            problems.append(f"image_root={self.image_root!r} is not a directory; set it to the folder of the image files")
        if self.max_images is not None and self.max_images < 1:
            problems.append(f"max_images={self.max_images}; must be >= 1 or unset")
        return problems


def resolve_inside(root: str | os.PathLike, name: str | os.PathLike, row: str, allow_outside_root: bool = False) -> Path:
    """``root / name`` (``name`` relative to ``root``, or absolute), refused when it leads outside ``root``.

    Symlinks are followed, so a link inside ``root`` pointing elsewhere is outside too: a data file must not make
    a run read arbitrary files. ``row`` names the entry in the error; ``allow_outside_root`` lifts the check.
    """
    path = Path(root) / name
    if not allow_outside_root and not path.resolve().is_relative_to(_resolved(os.fspath(root))):
        raise ValueError(f"{row}: image path {os.fspath(name)!r} leads outside its root {os.fspath(root)!r}; move the "
                         "image inside it, or set allow_outside_root: true if the data is trusted")
    return path


@functools.lru_cache(maxsize=32)
def _resolved(root: str) -> Path:
    """``root`` with its symlinks resolved, once per root: a source checks every one of its (maybe a million) files."""
    return Path(root).resolve()


def _printable(name: str) -> str:
    """A file name as text even when its bytes are not UTF-8 (shown with \\x escapes)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _unlistable(path: Path, relative: str) -> str | None:
    """Why a folder source leaves ``path`` out (None: it keeps it). Its id must be text every later step can
    encode (prompt seeding, parquet, JSON), and an empty file holds no image."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8"
    if path.stat().st_size == 0:
        return "empty file"
    return None


def load_image_or_reason(loader: Any) -> tuple[Image.Image | None, str | None]:
    """(image, None), or (None, why) for an image that cannot be read: a source reports it instead of failing."""
    try:
        return load_rgb(loader), None
    except ImageLoadError as error:
        return None, error.reason


class FolderSource(ImageSource):
    """Every image below ``root`` (sorted, recursive). With ``labelled``, the class of an image is the name
    of its first-level sub-folder (``root/<class>/...``), as in torchvision's ImageFolder layout."""

    def __init__(self, root: str | os.PathLike, labelled: bool = False, allow_outside_root: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist; pass a directory of images")
        self.paths, self.skipped = [], []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
            relative = path.relative_to(self.root).as_posix()
            reason = _unlistable(path, relative)
            if reason is not None:
                self.skipped.append({"source_id": _printable(relative), "reason": reason})
                continue
            resolve_inside(self.root, relative, f"image folder {self.root}, file {relative}", allow_outside_root)
            self.paths.append(path)
        if self.skipped:
            shown = ", ".join(f"{entry['source_id']} ({entry['reason']})" for entry in self.skipped[:5])
            logger.warning("image folder %s: skipping %d file(s): %s%s", self.root, len(self.skipped), shown,
                           ", ..." if len(self.skipped) > 5 else "")
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found below {self.root}")
        self.name = f"folder:{self.root}"
        if labelled:
            classes = sorted({p.relative_to(self.root).parts[0] for p in self.paths if len(p.relative_to(self.root).parts) > 1})
            if not classes:
                raise ValueError(f"labelled folder {self.root} needs one sub-folder per class (root/<class>/<image>)")
            self.class_names = classes
            self.paths = [p for p in self.paths if len(p.relative_to(self.root).parts) > 1]

    def __len__(self) -> int:
        return len(self.paths)

    def source_id(self, index: int) -> str:
        return self.paths[index].relative_to(self.root).as_posix()

    def _record(self, index: int) -> ImageRecord:
        path = self.paths[index]
        relative = self.source_id(index)
        image, error = load_image_or_reason(path)
        label = self.class_names.index(path.relative_to(self.root).parts[0]) if self.class_names else None
        return ImageRecord(source_id=relative, image=image, label=label, error=error)


class HFDatasetSource(ImageSource):
    """A Hugging Face dataset: a ``save_to_disk`` directory, or a hub id (needs network) with ``split``."""

    def __init__(
        self,
        path_or_id: str,
        split: str = "train",
        image_column: str = "image",
        label_column: str | None = None,
        id_column: str | None = None,
        caption_column: str | None = None,
        question_column: str | None = None,
        answers_column: str | None = None,
        allow_outside_root: bool = False,
    ):
        import datasets

        if Path(path_or_id).is_dir():
            loaded = datasets.load_from_disk(path_or_id)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{path_or_id} has splits {sorted(loaded)}, not {split!r}; set split")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(path_or_id, split=split)
        for column in (image_column, label_column, id_column, caption_column, question_column, answers_column):
            if column is not None and column not in loaded.column_names:
                raise ValueError(f"dataset {path_or_id} has no column {column!r}; its columns are {loaded.column_names}")
        self.dataset = loaded.cast_column(image_column, datasets.Image(decode=False))
        # A saved dataset embeds its images; a row with a file path instead is read inside the dataset's folder.
        self.root = Path(path_or_id) if Path(path_or_id).is_dir() else None
        self.external: dict[int, Path] = {}
        if self.root is not None:
            import pyarrow.compute as pc

            start = 0  # arrow compute on the memory-mapped column: the image bytes are never copied
            for chunk in self.dataset.select_columns([image_column]).with_format("arrow")[:][image_column].chunks:
                paths = chunk.field("path")
                for i in pc.indices_nonzero(pc.and_(pc.is_null(chunk.field("bytes")), pc.is_valid(paths))).to_pylist():
                    self.external[start + i] = resolve_inside(self.root, paths[i].as_py(), f"{path_or_id} row {start + i}",
                                                              allow_outside_root)
                start += len(chunk)
        self.image_column, self.label_column, self.id_column, self.caption_column = image_column, label_column, id_column, caption_column
        self.question_column, self.answers_column = question_column, answers_column
        self.name = f"hf:{path_or_id}[{split}]"
        if label_column is not None:
            feature = loaded.features[label_column]
            self.class_names = list(feature.names) if hasattr(feature, "names") else sorted({str(v) for v in loaded[label_column]})

    def __len__(self) -> int:
        return len(self.dataset)

    def source_id(self, index: int) -> str:
        return str(self.dataset[index][self.id_column]) if self.id_column else f"{index:08d}"

    def question_counts(self) -> list[int] | None:
        return [1] * len(self) if self.question_column and self.answers_column else None

    def _record(self, index: int) -> ImageRecord:
        row = self.dataset[index]
        source_id = self.source_id(index)
        image, error = load_image_or_reason(self.external.get(index, row[self.image_column]))
        label = None
        if self.label_column is not None:
            raw = row[self.label_column]
            label = raw if isinstance(raw, int) else self.class_names.index(str(raw))
        captions = _as_list(row[self.caption_column]) if self.caption_column else []
        # One question per row (VQAv2 style) with its reference answers: a list, or one string.
        questions = [row[self.question_column]] if self.question_column else []
        answers = [_as_list(row[self.answers_column])] if self.answers_column else []
        return ImageRecord(source_id=source_id, image=image, label=label, captions=captions, questions=questions, answers=answers, error=error)


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and isinstance(value[0], dict) and "answer" in value[0]:
        return [item["answer"] for item in value]  # VQAv2's [{"answer": ..., "answer_confidence": ...}]
    return [str(item) for item in value]


class CocoSource(ImageSource):
    """A COCO-style captions file (``images`` with ``id`` and ``file_name``; ``annotations`` with
    ``image_id`` and ``caption``) and the folder holding the images; every ``file_name`` must lie inside it
    (checked when the source opens) unless ``allow_outside_root``."""

    def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike, allow_outside_root: bool = False):
        with open(annotation_file) as handle:
            try:
                content = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"{annotation_file} is not valid JSON ({error}); pass a COCO captions file") from error
        if "images" not in content:
            raise ValueError(f"{annotation_file} has no 'images' list; is it a COCO annotation file?")
        self.image_root = Path(image_root)
        self.images = sorted(content["images"], key=lambda image: image["id"])
        self.paths = [resolve_inside(self.image_root, entry["file_name"], f"{annotation_file} image id {entry['id']}",
                                     allow_outside_root) for entry in self.images]
        self.captions: dict[Any, list[str]] = {}
        for annotation in content.get("annotations", []):
            if "caption" in annotation:
                self.captions.setdefault(annotation["image_id"], []).append(annotation["caption"])
        self.name = f"coco:{annotation_file}"

    def __len__(self) -> int:
        return len(self.images)

    def source_id(self, index: int) -> str:
        return str(self.images[index]["id"])

    def _record(self, index: int) -> ImageRecord:
        entry = self.images[index]
        image, error = load_image_or_reason(self.paths[index])
        return ImageRecord(source_id=str(entry["id"]), image=image, captions=self.captions.get(entry["id"], []), error=error)


def open_source(
    spec: str,
    *,
    split: str = "train",
    n: int | None = None,
    labelled: bool = False,
    image_root: str | None = None,
    allow_outside_root: bool = False,
    **hf_columns: Any,
) -> ImageSource:
    """Open an image source from a short spec.

    ``<scheme>`` or ``<scheme>:<split>`` — a plugin's data (:mod:`adpo.plugins`, e.g. the bundled world's); a
    directory with ``dataset_info.json`` or ``dataset_dict.json`` — a saved HF dataset; any other directory — an
    image folder; a ``.json`` file — a COCO annotation file (``image_root`` defaults to its folder); anything else —
    a hub dataset id. ``n`` keeps the first n records. ``allow_outside_root`` lets image paths in
    the data lead outside the folder, the dataset directory or ``image_root`` (refused by default).
    """
    path = Path(spec)
    plugin_data = data_plugin(spec)
    if plugin_data is not None:
        plugin, plugin_split = plugin_data
        return plugin.open_source(plugin_split if plugin_split is not None else split, n)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        source: ImageSource = HFDatasetSource(spec, split=split, allow_outside_root=allow_outside_root, **hf_columns)
    elif path.is_dir():
        source = FolderSource(path, labelled=labelled, allow_outside_root=allow_outside_root)
    elif path.suffix == ".json":
        if not path.exists():
            raise FileNotFoundError(f"COCO annotation file {path} does not exist")
        source = CocoSource(path, image_root or path.parent, allow_outside_root=allow_outside_root)
    elif path.exists():
        raise ValueError(f"cannot read {spec} as an image source: pass a folder, a saved HF dataset, a COCO .json or a plugin's data")
    else:
        source = HFDatasetSource(spec, split=split, **hf_columns)
    return source if n is None else Truncated(source, n)


# Hub dataset ids are "name" or "owner/name"; any other spec that is not a plugin's data names a local path.
HUB_ID = re.compile(r"\w[\w.-]*(/[\w.-]+)?")


def check_source(spec: str, key: str, split: str | None = None, columns: dict[str, str | None] | None = None,
                 split_key: str = "split") -> None:
    """Raise :class:`adpo.errors.UsageError` naming ``key`` when ``spec`` cannot be what a stage reads, checked
    cheaply (no model, no download): a local path that does not exist, a hub id while the hub is offline and the id
    is not in the cache (a relative path that is not there looks like one), and for a saved HF dataset a missing
    ``split`` or a column it lacks (``columns``: config key -> column name; None: not used)."""
    from adpo.errors import UsageError

    plugin_data = data_plugin(spec)
    if plugin_data is not None:
        plugin, plugin_split = plugin_data
        if plugin.check_data is not None:
            try:
                plugin.check_data(plugin_split)
            except ValueError as error:
                raise UsageError(f"{key}={spec!r}: {error}") from None
        return
    path = Path(spec).expanduser()
    if not path.exists():
        if not HUB_ID.fullmatch(spec) or spec.endswith(".json"):
            raise UsageError(f"{key}={spec!r} does not exist; pass an existing path, a hub dataset id or a plugin's data such as the bundled world's")
        if _hub_offline() and not _hub_cached(spec):
            raise UsageError(f"{key}={spec!r} is no local path, and the hub is offline (HF_HUB_OFFLINE / "
                             "HF_DATASETS_OFFLINE) with no cached copy of such a dataset; give an existing path")
        return
    available = saved_dataset_columns(path, split, key, split_key)
    if available is None:
        return
    missing = {name: column for name, column in (columns or {}).items() if column is not None and column not in available}
    if missing:
        named = ", ".join(f"{name}={column!r}" for name, column in missing.items())
        raise UsageError(f"{key}={spec!r} has no column for {named}; its columns are {available}: set "
                         f"{'/'.join(missing)} to one of them")


def saved_dataset_columns(path: Path, split: str | None, key: str = "path", split_key: str = "split") -> list[str] | None:
    """The column names of a ``save_to_disk`` dataset directory (its ``split`` for a DatasetDict, else a
    UsageError naming ``key`` and ``split_key``), read from its metadata; None when ``path`` is no saved dataset."""
    from adpo.errors import UsageError

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        if split not in splits:
            raise UsageError(f"{key}={os.fspath(path)!r} has splits {splits}, not {split!r}; set {split_key} to one of them")
        path = path / split
    info = path / "dataset_info.json"
    if not info.is_file():
        return None
    features = json.loads(info.read_text(encoding="utf-8")).get("features") or {}
    return list(features)


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_cached(repo_id: str) -> bool:
    """Whether a hub dataset ``repo_id`` has a copy in the hub cache or the datasets cache (usable offline)."""
    from datasets import config as datasets_config
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}").exists() or \
        (Path(datasets_config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")).exists()


class Truncated(ImageSource):
    """The first ``n`` records of another source."""

    def __init__(self, inner: ImageSource, n: int):
        self.inner, self.n = inner, min(n, len(inner))
        self.class_names, self.name, self.skipped = inner.class_names, f"{inner.name}[:{n}]", inner.skipped

    def __len__(self) -> int:
        return self.n

    def source_id(self, index: int) -> str:
        return self.inner.source_id(index)

    def question_counts(self) -> list[int] | None:
        counts = self.inner.question_counts()
        return None if counts is None else counts[: self.n]

    def _record(self, index: int) -> ImageRecord:
        return self.inner[index]
