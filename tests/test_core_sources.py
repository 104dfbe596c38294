import json

import numpy as np
import pytest
import torch
from PIL import Image

from adpo.sources import CocoSource, FolderSource, HFDatasetSource, open_source


def _write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), i * 40, dtype=np.uint8)).save(folder / name)


def test_labelled_folder_source(tmp_path):
    _write_images(tmp_path / "cat", ["a.png", "b.png"])
    _write_images(tmp_path / "dog", ["c.png"])
    source = FolderSource(tmp_path, labelled=True)
    assert source.class_names == ["cat", "dog"]
    assert [source[i].label for i in range(len(source))] == [0, 0, 1]
    assert source[2].source_id == "dog/c.png"


def test_corrupt_images_become_records_with_a_reason(tmp_path):
    _write_images(tmp_path, ["good.png"])
    (tmp_path / "broken.jpg").write_bytes(b"not an image at all")
    source = open_source(str(tmp_path))
    records = {source[i].source_id: source[i] for i in range(len(source))}
    assert records["good.png"].image is not None and records["good.png"].error is None
    assert records["broken.jpg"].image is None and "corrupt" in records["broken.jpg"].error


def test_coco_source_groups_captions(tmp_path):
    _write_images(tmp_path / "images", ["1.jpg", "2.jpg"])
    annotations = {
        "images": [{"id": 2, "file_name": "2.jpg"}, {"id": 1, "file_name": "1.jpg"}],
        "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 1, "caption": "uno"}, {"image_id": 2, "caption": "two"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    source = CocoSource(tmp_path / "captions.json", tmp_path / "images")
    assert [source[0].source_id, source[1].source_id] == ["1", "2"]
    assert source[0].captions == ["one", "uno"]


def test_hf_dataset_source_from_disk(tmp_path):
    import datasets

    images = [Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8)) for v in (0, 255)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    datasets.Dataset.from_dict({"image": images, "label": [0, 1]}, features=features).save_to_disk(tmp_path / "ds")
    source = open_source(str(tmp_path / "ds"), label_column="label")
    assert isinstance(source, HFDatasetSource) and source.class_names == ["dark", "light"]
    assert source[1].label == 1 and source[1].image.mode == "RGB"


def test_unknown_column_is_named(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"picture": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match="no column 'image'"):
        open_source(str(tmp_path / "ds"))


def test_hf_dataset_source_reads_vqa_columns(tmp_path):
    import datasets

    image = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    datasets.Dataset.from_dict(
        {"image": [image], "question": ["what color?"], "answers": [[{"answer": "black"}, {"answer": "dark"}]]}
    ).save_to_disk(tmp_path / "vqa")
    record = open_source(str(tmp_path / "vqa"), question_column="question", answers_column="answers")[0]
    assert record.questions == ["what color?"] and record.answers == [["black", "dark"]]


def test_pad_to_square_centres_the_image_between_bands_of_the_mean_colour():
    from adpo.preprocess import to_pixels
    from adpo.testing import tiny_image_processor

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high
    processor = tiny_image_processor(20)  # the padded 20x20 square needs no resize
    fill = torch.tensor([int(255 * m) for m in processor.image_mean]) / 255
    padded = to_pixels(Image.fromarray(wide), processor, pad_to_square=True)[0]
    assert padded.shape == (3, 20, 20)
    assert torch.equal(padded[:, 5:15], torch.from_numpy(wide).permute(2, 0, 1) / 255)
    for band in (padded[:, :5], padded[:, 15:]):
        assert torch.equal(band, fill[:, None, None].expand_as(band))
    # Without padding the processor resizes the short side and centre-crops: the sides of the image are lost.
    cropped = to_pixels(Image.fromarray(wide), processor)[0]
    assert cropped.shape == (3, 20, 20) and not torch.equal(cropped, padded)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 10 wide, 20 high: bands left and right
    padded_tall = to_pixels(Image.fromarray(tall), processor, pad_to_square=True)[0]
    assert torch.equal(padded_tall[:, :, 5:15], torch.from_numpy(tall).permute(2, 0, 1) / 255)
    assert torch.equal(padded_tall[:, :, :5], fill[:, None, None].expand(3, 20, 5))


def test_transformers_torchvision_fallback_warning_is_silenced_once_adpo_is_imported():
    import importlib.util
    import os
    import subprocess
    import sys

    def stderr_of(code):
        env = os.environ | {"TRANSFORMERS_VERBOSITY": "warning"}  # the tests run quiet; a user's command does not
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stderr

    message = "requires torchvision (not installed); falling back to"
    if importlib.util.find_spec("torchvision") is None:  # only then does transformers warn at all
        assert message in stderr_of("from transformers import CLIPImageProcessor")
    assert message not in stderr_of("import adpo\nfrom transformers import CLIPImageProcessor")
    # Only that message: the logger's other warnings still come through.
    assert "another warning" in stderr_of("import adpo\nfrom transformers.utils import import_utils\n"
                                          "import_utils.logger.warning('another warning')")
