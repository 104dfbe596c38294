"""The bundled world's images as an :class:`adpo.sources.ImageSource`: labels, captions and question/answer pairs,
and the world's data names (``world``, ``world:<split>``, ``world:<split>@<seeds>``)."""

from __future__ import annotations

from typing import Sequence

from adpo.sources import ImageRecord, ImageSource, load_image_or_reason
from adpo.world.data import CLASS_NAMES, load_world_dataset


class WorldSource(ImageSource):
    """The first ``n`` procedural images of a world split (generated on first use, then cached); with several
    ``seeds``, that split of each seed's world one after the other (as WorldCLIP's pre-training joins them)."""

    def __init__(self, split: str = "train", n: int | None = None, seeds: Sequence[int] = (0,)):
        self.parts = [load_world_dataset(split, seed=seed) for seed in seeds]
        total = sum(len(part) for part in self.parts)
        if n is not None and not 0 <= n <= total:
            raise ValueError(f"n={n} is outside world:{split} ({total} images)")
        self.size = total if n is None else n
        self.class_names = list(CLASS_NAMES)
        self.name = f"world:{split}" + ("" if list(seeds) == [0] else "@" + ",".join(map(str, seeds)))

    def __len__(self) -> int:
        return self.size

    def _row(self, index: int) -> dict:
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)

    def source_id(self, index: int) -> str:
        return str(self._row(index)["id"])

    def question_counts(self) -> list[int]:
        counts = [len(questions) for part in self.parts for questions in part["questions"]]
        return counts[: self.size]

    def _record(self, index: int) -> ImageRecord:
        row = self._row(index)
        image, error = load_image_or_reason(row["image"])
        return ImageRecord(
            source_id=row["id"], image=image, label=row["label"], captions=list(row["captions"]),
            questions=list(row["questions"]), answers=list(row["answers"]), error=error,
        )


def parse_world_split(spec: str | None) -> tuple[str, tuple[int, ...]]:
    """``None`` / ``"train"`` / ``"train@0-7"`` / ``"train@0,2,5"`` -> (split, seeds); a clear error otherwise."""
    split, _, seeds_text = (spec or "train").partition("@")
    if not seeds_text:
        return split, (0,)
    seeds: list[int] = []
    try:
        for part in seeds_text.split(","):
            first, _, last = part.partition("-")
            seeds += range(int(first), int(last or first) + 1)
    except ValueError:
        raise ValueError(f"world:{spec}: the seeds after '@' are numbers, ranges or both (e.g. train@0-7, train@0,3)") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise ValueError(f"world:{spec}: name each seed once (e.g. world:{split}@0-7)")
    return split, tuple(seeds)
