"""The bundled world's procedural data: determinism, splits, schema, and answers consistent with the scene."""

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from adpo.errors import UsageError
from adpo.sources import check_source
from adpo.world import data as world_data
from adpo.world import source as world_source
from adpo.world.data import (
    CLASS_NAMES,
    CLASS_PROMPT_TEMPLATE,
    COLOR_RGB,
    COLORS,
    SHAPES,
    class_index,
    generate_world_image,
    load_world_dataset,
)
from adpo.world.source import parse_world_split


@pytest.fixture(scope="module")
def world_cache(tmp_path_factory):
    """A private cache so tests neither depend on nor disturb the user's cached splits."""
    root = tmp_path_factory.mktemp("adpo-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("ADPO_CACHE", str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def val_rows(world_cache):
    return load_world_dataset("val", n=200, progress=False)


def test_constants():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8
    assert CLASS_NAMES == [f"{c} {s}" for c in COLORS for s in SHAPES]
    assert CLASS_PROMPT_TEMPLATE == "a photo of a {}"
    assert class_index("blue", "star") == CLASS_NAMES.index("blue star")
    rgb = np.array([COLOR_RGB[c] for c in COLORS], dtype=float)
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(COLORS)) * 1e9
    assert gaps.min() > 80, "object colours must be visually distinct"


def test_generator_is_deterministic_and_seed_sensitive():
    a = generate_world_image(123)
    b = generate_world_image(123)
    c = generate_world_image(124)
    assert a.image.size == (64, 64) and a.image.mode == "RGB"
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects
    assert a.image.tobytes() != c.image.tobytes()


@pytest.mark.parametrize("background", world_data.BACKGROUNDS)
@pytest.mark.parametrize("n_objects", [1, 2])
def test_primary_object_is_drawn_in_its_colour(background, n_objects):
    """The pixel at the primary object's centre carries (close to) the object's colour on every background."""
    for seed in range(6):
        world = generate_world_image(seed, n_objects=n_objects, background=background)
        primary = world.objects[0]
        pixel = np.asarray(world.image)[int(primary.y), int(primary.x)].astype(float)
        distances = {c: np.linalg.norm(pixel - np.array(rgb)) for c, rgb in COLOR_RGB.items()}
        assert min(distances, key=distances.get) == primary.color


def test_two_objects_are_distinct_and_on_opposite_sides():
    for seed in range(300):
        world = generate_world_image(seed, n_objects=2)
        p, s = world.objects
        assert p.shape != s.shape and p.color != s.color
        assert p.size > s.size
        assert (p.x < 32) != (s.x < 32)
        assert abs(p.x - s.x) >= p.size + s.size, "objects must not overlap"
        for o in world.objects:
            assert o.size <= o.x <= 64 - o.size and o.size <= o.y <= 64 - o.size


def test_dataset_schema_and_one_word_answers(val_rows):
    assert len(val_rows) == 200
    required = {"id", "image", "label", "color", "shape", "objects", "captions", "questions", "answers"}
    assert required <= set(val_rows.column_names)
    for row in val_rows:
        assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
        assert CLASS_NAMES[row["label"]] == f"{row['color']} {row['shape']}"
        primary = row["objects"][0]
        assert (primary["color"], primary["shape"]) == (row["color"], row["shape"])
        assert len(row["captions"]) >= 3 and len(set(row["captions"])) == len(row["captions"])
        assert all(f"{row['color']} {row['shape']}" in c for c in row["captions"])
        assert len(row["questions"]) == len(row["answers"]) >= 3
        for answer in row["answers"]:
            assert answer == answer.lower() and len(answer.split()) == 1 and answer.isalpha()


def _expected_answer(question: str, objects: list[dict]) -> str:
    """Answer a question from the scene description alone (independent of the generator's own QA code)."""
    q = question.lower().rstrip("?")
    by_shape = {o["shape"]: o for o in objects}
    by_color = {o["color"]: o for o in objects}
    if q == "how many objects are there":
        return {1: "one", 2: "two"}[len(objects)]
    if q == "what shape is in the image":
        return objects[0]["shape"]
    if q.startswith("what color is the ") and q.split()[-1] in by_shape:
        return by_shape[q.split()[-1]]["color"]
    if q.startswith("what shape is the ") and q.endswith(" object") and q.split()[-2] in by_color:
        return by_color[q.split()[-2]]["shape"]
    if q == "what shape is on the left":
        return min(objects, key=lambda o: o["x"])["shape"]
    if q == "what color is the object on the right":
        return max(objects, key=lambda o: o["x"])["color"]
    if q == "what shape is the larger object":
        return max(objects, key=lambda o: o["size"])["shape"]
    if q.startswith("is the ") and q.endswith(" on the left or on the right"):
        color, shape = q.split()[2:4]
        obj = by_shape[shape]
        assert obj["color"] == color
        return "left" if obj["x"] < 32 else "right"
    raise AssertionError(f"test does not know how to answer {question!r}")


def test_answers_match_the_objects(val_rows):
    kinds = set()
    for row in val_rows:
        for question, answer in zip(row["questions"], row["answers"]):
            assert answer == _expected_answer(question, row["objects"]), (row["id"], question)
            kinds.add(answer)
    assert {"one", "two", "left", "right"} <= kinds


def test_coverage_of_colours_shapes_and_backgrounds(world_cache):
    rows = load_world_dataset("test", progress=False)
    assert len(rows) >= 500
    assert set(rows["color"]) == set(COLORS) and set(rows["shape"]) == set(SHAPES)
    assert set(rows["background"]) == set(world_data.BACKGROUNDS)
    assert len(set(rows["label"])) == len(CLASS_NAMES)
    assert {len(o) for o in rows["objects"]} == {1, 2}


def test_load_is_cached_and_byte_identical(world_cache):
    first = load_world_dataset("val", n=50, progress=False)
    second = load_world_dataset("val", n=50, progress=False)
    assert world_data.dataset_fingerprint(first) == world_data.dataset_fingerprint(second)
    cached = list((world_cache / "world" / "data").glob("v*-seed0/val/dataset_info.json"))
    assert len(cached) == 1
    # A fresh generation (no cache) reproduces the cached bytes exactly.
    fresh = world_data.generate_split("val", n=50, progress=False)
    assert world_data.dataset_fingerprint(fresh) == world_data.dataset_fingerprint(first)


def test_splits_are_disjoint_and_seeded(world_cache):
    val = load_world_dataset("val", n=100, progress=False)
    test = load_world_dataset("test", n=100, progress=False)
    other_seed = world_data.generate_split("val", seed=1, n=100, progress=False)

    def hashes(ds):
        from datasets import Image as ImageFeature

        return {bytes(item["bytes"]) for item in ds.cast_column("image", ImageFeature(decode=False))["image"]}

    assert not hashes(val) & hashes(test)
    assert not hashes(val) & hashes(other_seed)
    assert not set(val["id"]) & set(test["id"])


def test_split_sizes_and_bad_arguments(world_cache):
    assert world_data.SPLIT_SIZES["train"] >= 4000
    assert world_data.SPLIT_SIZES["val"] >= 500 and world_data.SPLIT_SIZES["test"] >= 500
    with pytest.raises(ValueError, match="unknown split"):
        load_world_dataset("dev")
    with pytest.raises(ValueError, match="outside"):
        load_world_dataset("val", n=10**6)


def test_captions_and_questions_use_only_the_world_vocabulary(val_rows):
    vocabulary = set(world_data.world_vocabulary())
    for row in val_rows:
        for text in list(row["captions"]) + list(row["questions"]):
            words = text.lower().replace("?", " ").replace(":", " ").split()
            assert set(words) <= vocabulary, text


def test_png_round_trip_is_lossless():
    world = generate_world_image(7)
    record = world_data.world_record(world, "x")
    decoded = Image.open(io.BytesIO(record["image"]["bytes"])).convert("RGB")
    assert decoded.tobytes() == world.image.tobytes()


@pytest.mark.parametrize("spec, expected", [
    (None, ("train", (0,))), ("val", ("val", (0,))), ("train@0-2,5", ("train", (0, 1, 2, 5))), ("test@3", ("test", (3,))),
])
def test_world_data_names_with_seeds(spec, expected):
    assert parse_world_split(spec) == expected


@pytest.mark.parametrize("spec, message", [("train@1,1", "name each seed once"), ("train@a-b", "numbers, ranges")])
def test_bad_seeds_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_world_split(spec)


def test_a_source_of_several_seeds_joins_their_splits_in_order(monkeypatch):
    def fake_split(split, seed=0):
        return datasets.Dataset.from_list([{"id": f"{split}-{seed}-{i}", "image": None, "label": i, "captions": [],
                                            "questions": ["q"] * (i + seed), "answers": [["a"]] * (i + seed)} for i in range(3)])

    monkeypatch.setattr(world_source, "load_world_dataset", fake_split)
    joined = world_source.WorldSource("val", seeds=(2, 5))
    assert [joined.source_id(i) for i in range(len(joined))] == [f"val-{s}-{i}" for s in (2, 5) for i in range(3)]
    assert joined.name == "world:val@2,5"
    assert joined.question_counts() == [2, 3, 4, 5, 6, 7]  # read without decoding an image
    truncated = world_source.WorldSource("val", n=4, seeds=(2, 5))
    assert len(truncated) == 4 and truncated.question_counts() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="n=7 is outside world:val"):
        world_source.WorldSource("val", n=7, seeds=(2, 5))


def test_a_world_split_that_does_not_exist_is_refused_before_any_model_loads():
    with pytest.raises(UsageError, match=r"dataset='world:tain@0-3': the world has no split 'tain'"):
        check_source("world:tain@0-3", "dataset")
    check_source("world:val@0-7", "dataset")  # nothing generated or loaded
