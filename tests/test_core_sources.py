import json
import os

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


def _coco(tmp_path, file_name):
    _write_images(tmp_path / "images", ["inside.png"])
    annotations = {"images": [{"id": 1, "file_name": "inside.png"}, {"id": 7, "file_name": file_name}], "annotations": []}
    (tmp_path / "captions.json").write_text(json.dumps(annotations))
    return tmp_path / "captions.json"


@pytest.mark.parametrize("escape", ["../outside.png", "absolute"])
def test_coco_file_names_outside_the_image_root_are_refused_unless_allowed(tmp_path, escape):
    _write_images(tmp_path, ["outside.png"])
    file_name = str(tmp_path / "outside.png") if escape == "absolute" else escape
    annotation_file = _coco(tmp_path, file_name)
    with pytest.raises(ValueError, match="image id 7") as refused:
        open_source(str(annotation_file), image_root=str(tmp_path / "images"))
    message = str(refused.value)
    assert "\n" not in message and repr(file_name) in message and "allow_outside_root" in message
    source = open_source(str(annotation_file), image_root=str(tmp_path / "images"), allow_outside_root=True)
    assert [source[i].image is not None for i in range(len(source))] == [True, True]


def test_paths_inside_the_root_are_read_whatever_their_spelling(tmp_path):
    annotation_file = _coco(tmp_path, str(tmp_path / "images" / "sub" / ".." / "inside.png"))
    (tmp_path / "images" / "sub").mkdir()
    source = open_source(str(annotation_file), image_root=str(tmp_path / "images"))
    assert source[1].image is not None


def test_a_folder_symlink_leading_out_of_the_folder_is_refused_unless_allowed(tmp_path):
    _write_images(tmp_path, ["secret.png"])
    _write_images(tmp_path / "images", ["a.png"])
    (tmp_path / "images" / "b.png").symlink_to(tmp_path / "secret.png")
    with pytest.raises(ValueError, match="file b.png.*leads outside"):
        open_source(str(tmp_path / "images"))
    assert len(open_source(str(tmp_path / "images"), allow_outside_root=True)) == 2


def test_a_saved_dataset_row_with_a_path_outside_its_folder_is_refused_unless_allowed(tmp_path):
    import datasets

    _write_images(tmp_path, ["outside.png"])
    _write_images(tmp_path / "ds", ["inside.png"])
    # path-only rows, as a hand-made dataset may hold (save_to_disk itself embeds the bytes of an Image column)
    features = datasets.Features({"image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")}})
    rows = [{"bytes": None, "path": "inside.png"}, {"bytes": None, "path": str(tmp_path / "outside.png")}]
    datasets.Dataset.from_dict({"image": rows}, features=features).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match="row 1: image path .*outside.png"):
        open_source(str(tmp_path / "ds"))
    source = open_source(str(tmp_path / "ds"), allow_outside_root=True)
    assert source[0].image is not None and source[1].image is not None


def test_odd_files_in_a_folder_are_skipped_with_a_warning_and_exif_rotation_is_applied(tmp_path, caplog):
    from PIL import ExifTags

    folder = tmp_path / "images"
    _write_images(folder, ["good.png"])
    (folder / os.fsdecode(b"bad\xff.png")).write_bytes((folder / "good.png").read_bytes())
    (folder / "empty.png").write_bytes(b"")
    # stored 32 wide x 16 high, left half red, right half blue; orientation 6: shown turned 90 degrees clockwise
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, :16] = (255, 0, 0)
    stored[:, 16:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(folder / "rotated.jpg", exif=exif, quality=95)

    with caplog.at_level("WARNING", logger="adpo.sources"):
        source = open_source(str(folder))
    assert [source.source_id(i) for i in range(len(source))] == ["good.png", "rotated.jpg"]
    assert source.skipped == [{"source_id": "bad\\xff.png", "reason": "file name is not valid UTF-8"},
                              {"source_id": "empty.png", "reason": "empty file"}]
    assert "skipping 2 file(s)" in caplog.text and "bad\\xff.png" in caplog.text
    upright = np.asarray(source[1].image)
    assert upright.shape == (32, 16, 3)  # turned: now 16 wide x 32 high, red on top, blue below
    assert upright[4, 8, 0] > 200 and upright[4, 8, 2] < 60
    assert upright[28, 8, 2] > 200 and upright[28, 8, 0] < 60
