"""Every shipped eval config parses into an EvalConfig (the dataclass validates task, schedule, eps)."""

import json
from pathlib import Path

import pytest
from trl import TrlParser

from adpo.eval.config import EvalConfig
from adpo.threat import parse_eps

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "eval").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_eval_config_parses(path, tmp_path):
    import yaml

    # the data of the real-model configs is not on the test machine (the config refuses a missing path): stand-ins
    data = str(yaml.safe_load(path.read_text())["data"])
    stand_ins = [] if data.startswith("world") else ["--data", str(tmp_path), "--image_root", str(tmp_path)]
    (config,) = TrlParser((EvalConfig,)).parse_args_and_config(["--config", str(path), "--output_dir", str(tmp_path / "out"), *stand_ins])
    assert config.attack_steps >= 1 and config.attack_eps
    for eps in config.attack_eps:
        if eps != "world":
            assert 0 < parse_eps(eps) < 1


def test_configs_exist():
    assert {"world_vqa.yaml", "world_caption.yaml", "world_zeroshot.yaml", "world_targeted.yaml"} <= {p.name for p in CONFIGS}


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="task="):
        EvalConfig(task="segmentation")
    with pytest.raises(ValueError, match="precision_schedule"):
        EvalConfig(precision_schedule=["fp8"])


def coco_layout(root, sizes=((40, 20), (20, 30))):
    """The standard COCO layout: annotations/captions_val2014.json beside val2014/ with the image files."""
    import numpy as np
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index, (width, height) in enumerate(sizes, start=1):
        name = f"COCO_val2014_{index:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": index, "file_name": name})
        annotations.append({"image_id": index, "caption": f"picture number {index}"})
    path = root / "annotations" / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_layout_reads_images_from_image_root(tmp_path):
    from adpo.eval.loading import load_samples

    annotations = coco_layout(tmp_path / "coco")
    config = EvalConfig(task="caption", data=str(annotations), num_samples=2, image_root=str(tmp_path / "coco" / "val2014"))
    samples, _ = load_samples(config)
    assert [s.references for s in samples] == [["picture number 1"], ["picture number 2"]]
    assert [s.image.size for s in samples] == [(40, 20), (20, 30)]
    with pytest.raises(ValueError, match="set image_root"):  # the images are not beside the json
        load_samples(EvalConfig(task="caption", data=str(annotations), num_samples=2))
    with pytest.raises(ValueError, match="image_root='nowhere' is not a directory"):
        load_samples(EvalConfig(task="caption", data=str(annotations), image_root="nowhere"))
    # an image root one level above the images' own folder: file names that climb out of it are refused, unless allowed
    escaping = tmp_path / "coco" / "annotations" / "escaping.json"
    content = json.loads(annotations.read_text())
    for image in content["images"]:
        image["file_name"] = f"../val2014/{image['file_name']}"
    escaping.write_text(json.dumps(content))
    inner = tmp_path / "coco" / "annotations"
    with pytest.raises(ValueError, match="leads outside its root"):
        load_samples(EvalConfig(task="caption", data=str(escaping), num_samples=2, image_root=str(inner)))
    allowed, _ = load_samples(EvalConfig(task="caption", data=str(escaping), num_samples=2, image_root=str(inner),
                                         allow_outside_root=True))
    assert [s.image.size for s in allowed] == [(40, 20), (20, 30)]


def test_prepare_pads_to_square_when_asked(tmp_path):
    import torch

    from adpo.eval.loading import prepare
    from adpo.preprocess import to_pixels
    from adpo.sources import open_source
    from adpo.testing import tiny_llava

    model, processor = tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    annotations = coco_layout(tmp_path / "coco")
    images = [record.image for record in open_source(str(annotations), image_root=str(tmp_path / "coco" / "val2014"))]
    config = dict(model=str(tmp_path / "model"), task="caption", data=str(annotations), num_samples=2,
                  image_root=str(tmp_path / "coco" / "val2014"))
    _, _, padded, _ = prepare(EvalConfig(**config, pad_to_square=True))
    _, _, cropped, _ = prepare(EvalConfig(**config))
    assert torch.equal(padded, to_pixels(images, processor, pad_to_square=True))
    assert torch.equal(cropped, to_pixels(images, processor)) and not torch.equal(padded, cropped)
