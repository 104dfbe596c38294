"""The run's images: an ``adpo.sources`` source plus its source ids, listed without decoding every image.

Planning needs every image's ``source_id`` (prompts are chosen per id, and the run manifest checks the
list); decoding a whole COCO split just to read ids would cost each process minutes, so ids are read
from the source's index where the source keeps one.
"""

from __future__ import annotations

from typing import Iterator, Sequence

from PIL import Image

from adpo.sources import ImageSource, open_source
from pairs.config import PairsConfig


class RunImages:
    """The source, its ids in order, the files it left out when listing (``source.skipped``, reported with the
    unreadable images), and loading by position (a reason string instead of an image when unreadable)."""

    def __init__(self, source: ImageSource):
        self.source = source
        self.source_ids = [source.source_id(i) for i in range(len(source))]
        self.skipped = list(source.skipped)

    def load(self, positions: Sequence[int]) -> Iterator[tuple[str, Image.Image | str]]:
        for position in positions:
            record = self.source[position]
            if record.source_id != self.source_ids[position]:
                raise RuntimeError(
                    f"source {self.source.name} gave id {record.source_id!r} at position {position}, planned "
                    f"{self.source_ids[position]!r}; the source changed during the run"
                )
            if record.image is None:
                yield record.source_id, record.error or "unreadable image"
            else:
                yield record.source_id, record.image


def open_image_source(config: PairsConfig) -> RunImages:
    hf_columns = {"image_column": config.image_column}
    if config.id_column:
        hf_columns["id_column"] = config.id_column
    source = open_source(config.resolved_source(), split=config.source_split, n=config.max_images, image_root=config.image_root,
                         allow_outside_root=config.allow_outside_root, **hf_columns)
    return RunImages(source)
