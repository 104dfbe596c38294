"""pairs/: end-to-end runs on a tiny random LLaVA: schema, ε constraint after the PNG round trip, resume,
bad input, reference log-probs, and a two-process (gloo) run."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adpo.lvlm import LlavaView
from adpo.models import load_lvlm
from adpo.preprocess import to_pixels
from adpo.testing import tiny_llava
from adpo.threat import ThreatModel
from pairs import FEATURES, PairsConfig, load_pairs
from pairs.generate import run
from pairs.shards import shard_paths

CONTENT_COLUMNS = [name for name in FEATURES] + ["ref_chosen_logps", "ref_rejected_logps"]
GOOD_IMAGES = 7
PROMPTS_PER_IMAGE = 2


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: extra threads only add contention on a shared 2-core machine (10x slower there).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    model, processor = tiny_llava(seed=3)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    rgb(40, 56).save(images / "a_rgb.png")
    rgb(64, 48).save(images / "b_rgb.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8), "L").save(images / "c_gray.png")
    rgb(33, 45).convert("LA").save(images / "d_gray_alpha.png")
    rgba = np.concatenate([rng.integers(0, 256, (40, 40, 3)), rng.integers(0, 256, (40, 40, 1))], axis=2).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(images / "e_rgba.png")
    rgb(50, 40).convert("CMYK").save(images / "f_cmyk.jpg")
    rgb(32, 32).convert("P", palette=Image.ADAPTIVE, colors=16).save(images / "g_palette.png")
    (images / "h_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (images / "i_truncated.png").write_bytes(_png(rgb(40, 40))[:60])
    return root


def make_config(workspace: Path, out: Path, **overrides) -> PairsConfig:
    settings = dict(
        model_name_or_path=str(workspace / "model"),
        source=str(workspace / "images"),
        output_dir=str(out),
        prompt_set="describe",
        prompts_per_image=PROMPTS_PER_IMAGE,
        attack_steps=3,
        max_new_tokens=4,
        batch_size=2,
        images_per_shard=3,
        compute_ref_logps=True,
        progress=False,
        seed=11,
    )
    settings.update(overrides)
    return PairsConfig(**settings)


def content(dataset) -> dict:
    return {name: list(dataset[name]) for name in CONTENT_COLUMNS if name in dataset.column_names}


@pytest.fixture(scope="module")
def uninterrupted(workspace):
    out = workspace / "uninterrupted"
    summary = run(make_config(workspace, out))
    return out, summary, load_pairs(out)


def test_schema_and_counts(uninterrupted):
    out, summary, dataset = uninterrupted
    assert dataset.column_names == list(FEATURES) + ["ref_chosen_logps", "ref_rejected_logps"]
    assert {name: type(dataset.features[name]).__name__ for name in ("image", "adv_image")} == {"image": "Image", "adv_image": "Image"}
    assert len(dataset) == GOOD_IMAGES * PROMPTS_PER_IMAGE
    assert sorted(dataset["item_index"]) == dataset["item_index"]
    assert len(set(zip(dataset["source_id"], dataset["prompt"]))) == len(dataset)
    row = dataset[0]
    assert (row["norm"], row["steps"], row["seed"], row["embedding"]) == ("linf", 3, 11, "pooled")
    assert row["eps"] == pytest.approx(2 / 255) and row["step_size"] == pytest.approx(0.5 / 255)
    assert '"max_new_tokens": 4' in row["decoding"]
    assert all(d > 0 for d in dataset["embedding_distance"])
    assert all(c == (a != b) for a, b, c in zip(dataset["chosen"], dataset["rejected"], dataset["answers_differ"]))
    counts = summary["counts"]
    assert counts["pairs_generated"] == len(dataset) == counts["pairs_in_dataset"]
    assert counts["pairs_answer_changed"] + counts["pairs_answer_unchanged"] == len(dataset)
    assert counts["chosen_empty"] == sum(not a for a in dataset["chosen"])
    card = (out / "README.md").read_text()
    assert f"| pairs generated | {len(dataset)} |" in card


def test_stored_adversarial_image_is_in_the_ball_of_the_stored_clean_image(uninterrupted):
    _, _, dataset = uninterrupted
    to_tensor = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # noqa: E731
    threat = ThreatModel("linf", 2 / 255)
    moved = 0
    for row in dataset:
        clean, adv = to_tensor(row["image"]), to_tensor(row["adv_image"])
        assert bool(threat.contains(adv, clean).all())
        moved += int((adv != clean).any())
    assert moved == len(dataset)  # the attack did perturb every image


def test_stored_images_pass_through_the_processor_unchanged(uninterrupted):
    # the trainer re-reads the stored images with to_pixels: already at the model's size, they must come back exactly
    _, _, dataset = uninterrupted
    _, processor = tiny_llava()
    rows = dataset.select(range(4))
    for column in ("image", "adv_image"):
        images = list(rows[column])
        stored = torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])
        assert torch.equal((to_pixels(images, processor) * 255).round(), stored)


def test_stored_clean_image_is_exactly_what_the_attack_started_from(workspace, uninterrupted):
    _, _, dataset = uninterrupted
    _, processor = tiny_llava()
    for row in dataset.select(range(0, len(dataset), PROMPTS_PER_IMAGE)):
        expected = to_pixels([str(workspace / "images" / row["source_id"])], processor)[0]
        stored = torch.from_numpy(np.asarray(row["image"], dtype=np.float32)).permute(2, 0, 1)
        assert torch.equal((expected * 255).round(), stored)


def test_pad_to_square_reaches_the_stored_clean_image(workspace):
    out = workspace / "padded"
    run(make_config(workspace, out, max_images=1, prompts_per_image=1, pad_to_square=True))
    row = load_pairs(out)[0]
    _, processor = tiny_llava()
    image = str(workspace / "images" / row["source_id"])
    expected = to_pixels([image], processor, pad_to_square=True)[0]
    stored = torch.from_numpy(np.asarray(row["image"], dtype=np.float32)).permute(2, 0, 1)
    assert torch.equal((expected * 255).round(), stored)
    assert not torch.equal(expected, to_pixels([image], processor)[0])  # the image is not square: padding shows


def test_corrupt_images_are_skipped_and_reported(uninterrupted):
    out, summary, dataset = uninterrupted
    skipped = {entry["source_id"]: entry["reason"] for entry in summary["skipped_images"]}
    assert set(skipped) == {"h_corrupt.jpg", "i_truncated.png"}
    assert all("corrupt" in reason or "truncated" in reason for reason in skipped.values())
    assert summary["counts"]["images_skipped"] == 2 and summary["counts"]["images_used"] == GOOD_IMAGES
    assert not {"h_corrupt.jpg", "i_truncated.png"} & set(dataset["source_id"])
    assert {"c_gray.png", "d_gray_alpha.png", "e_rgba.png", "f_cmyk.jpg", "g_palette.png"} <= set(dataset["source_id"])
    assert "h_corrupt.jpg" in (out / "README.md").read_text()


def test_reference_logps_match_a_fresh_scoring_of_the_stored_pair(workspace, uninterrupted):
    _, _, dataset = uninterrupted
    model, processor = load_lvlm(str(workspace / "model"))
    view = LlavaView(model.eval(), processor)
    row = dataset[3]
    pixels = lambda im: torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]  # noqa: E731
    for image, answer, stored in ((row["image"], row["chosen"], row["ref_chosen_logps"]), (row["adv_image"], row["rejected"], row["ref_rejected_logps"])):
        encoded = view.encode([row["prompt"]], [answer])
        with torch.no_grad():
            fresh = view.answer_scores(pixels(image), encoded.input_ids, encoded.attention_mask, encoded.labels).sum_logps
        assert stored < 0
        assert stored == pytest.approx(float(fresh[0]), abs=1e-4)


def test_resumed_run_equals_uninterrupted_run(workspace, uninterrupted, monkeypatch):
    import pairs.shards

    _, _, reference = uninterrupted
    out = workspace / "resumed"
    config = make_config(workspace, out)
    real_write = pairs.shards.write_shard
    written = []

    def crash_after_two(*args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        real_write(*args, **kwargs)
        written.append(args[1])

    monkeypatch.setattr(pairs.shards, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.undo()
    assert written == [0, 1] and not (out / "dataset").exists()

    # what a kill -9 in the middle of the next shard leaves: a half-written temp file, and a data file
    # without its completion record
    data, marker = shard_paths(out, 2)
    (data.parent / f".{data.name}.abc.tmp").write_bytes(b"PAR1 half a parquet")
    data.write_bytes(b"PAR1 garbage")
    assert not marker.exists()
    finished_at = shard_paths(out, 0)[0].stat().st_mtime_ns

    summary = run(replace(config, progress=True))  # output-only settings may change on resume
    resumed = load_pairs(out)
    assert content(resumed) == content(reference)
    assert shard_paths(out, 0)[0].stat().st_mtime_ns == finished_at  # finished shards are not redone
    assert not list(data.parent.glob(".*.tmp"))
    assert summary["counts"]["pairs_generated"] == len(reference)


def test_unchanged_pairs_can_be_dropped_and_are_counted(workspace, uninterrupted):
    out, first, reference = uninterrupted
    # keep_unchanged only acts at the merge: re-running re-merges the finished shards without regenerating
    summary = run(make_config(workspace, out, keep_unchanged=False))
    dropped = load_pairs(out)
    changed = sum(reference["answers_differ"])
    assert len(dropped) == changed == summary["counts"]["pairs_in_dataset"]
    assert all(dropped["answers_differ"])
    assert summary["counts"]["pairs_answer_unchanged"] == len(reference) - changed
    assert summary["counts"]["unchanged_pairs"] == "dropped"
    run(make_config(workspace, out))  # restore for other tests using the module fixture
    assert len(load_pairs(out)) == len(reference)


def test_resume_with_other_content_settings_is_refused(workspace, uninterrupted):
    out, _, _ = uninterrupted
    with pytest.raises(ValueError, match="changed: attack_steps"):
        run(make_config(workspace, out, attack_steps=4))


@pytest.mark.distributed
def test_two_process_run_covers_every_item_once_and_matches_one_process(workspace, uninterrupted):
    _, _, reference = uninterrupted
    out = workspace / "two_processes"
    config = make_config(workspace, out)
    args = []
    for key, value in vars(config).items():
        if value is not None and value != PairsConfig.__dataclass_fields__[key].default:
            args += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # torchrun: `accelerate launch --cpu` starts one process only; PartialState then sets up gloo itself
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pairs.cli", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    dataset = load_pairs(out)
    assert len(dataset["item_index"]) == len(set(dataset["item_index"])) == len(reference)
    assert set(dataset["item_index"]) == set(reference["item_index"])
    records = [json.loads(shard_paths(out, i)[1].read_text()) for i in range(3)]
    assert {r["process_index"] for r in records} == {0, 1}
    assert content(dataset) == content(reference)


def test_a_shard_of_only_unreadable_images_merges_cleanly(workspace, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(images / "b_good.png")
    summary = run(make_config(workspace, tmp_path / "out", source=str(images), images_per_shard=1, prompts_per_image=1))
    dataset = load_pairs(tmp_path / "out")
    assert list(dataset["source_id"]) == ["b_good.png"]
    assert [entry["source_id"] for entry in summary["skipped_images"]] == ["a_bad.png"]


def test_a_merge_on_a_full_disk_leaves_no_cache_or_staging_behind_and_a_rerun_finishes(workspace, tmp_path, monkeypatch):
    import errno

    import datasets

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    config = make_config(workspace, tmp_path / "out", source=str(images), images_per_shard=1, prompts_per_image=1)
    save_to_disk = datasets.Dataset.save_to_disk

    def disk_full(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(config)
    left = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("."))
    assert left == [], left
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_to_disk)
    run(config)  # the shards were kept: the rerun only merges
    assert list(load_pairs(tmp_path / "out")["source_id"]) == ["a.png"]


def test_odd_files_are_skipped_and_listed_and_every_output_gets_the_umask_mode(workspace, tmp_path):
    from PIL import ExifTags

    images = tmp_path / "images"
    images.mkdir()
    (images / os.fsdecode(b"bad\xff.png")).write_bytes(_png(Image.new("RGB", (20, 20))))  # crashed the plan before
    (images / "empty.png").write_bytes(b"")
    stored = np.zeros((16, 32, 3), dtype=np.uint8)
    stored[:, 16:] = 255
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8  # shown turned 90 degrees counter-clockwise
    Image.fromarray(stored).save(images / "rotated.jpg", exif=exif, quality=95)
    previous = os.umask(0o022)
    try:
        summary = run(make_config(workspace, tmp_path / "out", source=str(images), prompts_per_image=1))
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert list(load_pairs(out)["source_id"]) == ["rotated.jpg"]
    assert {entry["source_id"]: entry["reason"] for entry in summary["skipped_images"]} == {
        "bad\\xff.png": "file name is not valid UTF-8", "empty.png": "empty file"}
    assert summary["counts"]["images_skipped"] == 2 and summary["counts"]["images_used"] == 1
    assert "| bad\\xff.png | file name is not valid UTF-8 |" in (out / "README.md").read_text()
    # the stored clean image is the upright one: turned counter-clockwise, the white right half is on top
    clean = np.asarray(load_pairs(out)[0]["image"], dtype=np.float32)
    height = clean.shape[0]
    assert clean[: height // 3].mean() > 200 and clean[-height // 3:].mean() < 55
    written = [out / "README.md", out / "summary.json", out / "run.json", *(out / "shards").iterdir(),
               *(path for path in (out / "dataset").rglob("*") if path.is_file())]
    assert {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in written} == {path.name: "0o644" for path in written}


def test_a_coco_file_name_outside_the_image_root_is_refused_before_the_model_loads(workspace, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the source was checked")

    monkeypatch.setattr("pairs.generate._load_model", no_model)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "outside.png")
    coco = tmp_path / "images" / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 5, "file_name": "../outside.png"}], "annotations": []}))
    with pytest.raises(ValueError, match="image id 5: image path '../outside.png' leads outside"):
        run(make_config(workspace, tmp_path / "out", source=str(coco)))
    monkeypatch.undo()
    summary = run(make_config(workspace, tmp_path / "out", source=str(coco), allow_outside_root=True, prompts_per_image=1))
    assert summary["counts"]["images_used"] == 1
