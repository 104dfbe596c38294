"""The bundled world's images as an :class:`adpo.sources.ImageSource`: labels, captions and question/answer pairs."""

from __future__ import annotations

from adpo.sources import ImageRecord, ImageSource, load_image_or_reason
from adpo.world.data import CLASS_NAMES, load_world_dataset


class WorldSource(ImageSource):
    """The first ``n`` procedural images of a world split (generated on first use, then cached)."""

    def __init__(self, split: str = "train", n: int | None = None, seed: int = 0):
        self.dataset = load_world_dataset(split, n=n, seed=seed)
        self.class_names = list(CLASS_NAMES)
        self.name = f"world:{split}"

    def __len__(self) -> int:
        return len(self.dataset)

    def source_id(self, index: int) -> str:
        return str(self.dataset[index]["id"])

    def _record(self, index: int) -> ImageRecord:
        row = self.dataset[index]
        image, error = load_image_or_reason(row["image"])
        return ImageRecord(
            source_id=row["id"], image=image, label=row["label"], captions=list(row["captions"]),
            questions=list(row["questions"]), answers=list(row["answers"]), error=error,
        )
