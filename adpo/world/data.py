"""The bundled world's procedural images: coloured shapes on varied backgrounds, with labels, captions and VQA.

Every image is 64x64 RGB and holds one or two objects (a shape in a colour). The *primary* object is the
larger one and defines the class ``label`` (index into :data:`CLASS_NAMES`, ``"{color} {shape}"``). A second,
smaller object (when present) always differs from the primary in both shape and colour and sits on the other
side of the image, so every question ("What color is the circle?", "What shape is on the left?") has exactly
one answer. Backgrounds are solid, gradient, noise or toned-down crops of the real photos that ship with
scikit-image, scikit-learn and matplotlib; all background tones are kept muted and mid-bright so the eight
object colours (white and black included) stay recognisable.

Generation is seeded and deterministic: ``generate_world_image(seed)`` gives the same pixels every time, and
:func:`load_world_dataset` builds fixed train/val/test splits from one seed (each image's seed is derived from
``(seed, split, index)``), caching them as a HF dataset under ``$ADPO_CACHE/world/data`` (default
``~/.cache/adpo/world/data``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from adpo.io import atomic_directory

# Bump when the pixels, captions or questions change: it keys the on-disk cache.
GENERATOR_VERSION = 1

IMAGE_SIZE = 64
SHAPES = ["circle", "square", "triangle", "diamond", "star", "cross"]
# Saturated or extreme colours: the backgrounds are muted and mid-bright, so each stays distinct from them.
COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 165, 45),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 30),
    "orange": (250, 135, 10),
    "purple": (135, 40, 185),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
COLORS = list(COLOR_RGB)
CLASS_NAMES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
CLASS_PROMPT_TEMPLATE = "a photo of a {}"
BACKGROUNDS = ["solid", "gradient", "noise", "photo"]
SPLIT_SIZES = {"train": 10000, "val": 500, "test": 500}
NUMBER_WORDS = {1: "one", 2: "two"}

# Supersampling factor for anti-aliased shape edges.
_SUPERSAMPLE = 4
# Muted background tones: a grey level in this range plus a small tint.
_BG_LEVEL = (85, 170)
_BG_TINT = 22
# Toned-down photos are squeezed into this grey-level range (and desaturated) so objects stand out.
_PHOTO_RANGE = (75, 180)
_PHOTO_SATURATION = 0.45
_TWO_OBJECT_PROBABILITY = 0.35


def class_index(color: str, shape: str) -> int:
    """Label of the class ``"{color} {shape}"``."""
    return COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)


@dataclass(frozen=True)
class WorldObject:
    """One drawn object: its shape, colour, radius in pixels and centre (x to the right, y down)."""

    shape: str
    color: str
    size: float
    x: float
    y: float


@dataclass(frozen=True)
class WorldImage:
    """A generated image with its scene description. ``objects[0]`` is the primary object."""

    image: Image.Image
    objects: tuple[WorldObject, ...]
    background: str

    @property
    def label(self) -> int:
        return class_index(self.objects[0].color, self.objects[0].shape)


# ----------------------------------------------------------------------------------------------- pixels


def _shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at (cx, cy), rotated by ``angle`` radians."""
    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float) * 0.82
    elif shape == "triangle":
        pts = np.array([[0.0, -1.0], [0.95, 0.65], [-0.95, 0.65]])
    elif shape == "diamond":
        pts = np.array([[0.0, -1.0], [0.72, 0.0], [0.0, 1.0], [-0.72, 0.0]])
    elif shape == "star":
        k = np.arange(10)
        rho = np.where(k % 2 == 0, 1.0, 0.42)
        theta = -np.pi / 2 + k * np.pi / 5
        pts = np.stack([rho * np.cos(theta), rho * np.sin(theta)], axis=1)
    elif shape == "cross":
        a, b = 0.3, 0.95
        pts = np.array(
            [[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a], [-b, -a], [-a, -a]]
        )
    else:
        raise ValueError(f"unknown polygon shape {shape!r}; expected one of {SHAPES}")
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rotation.T * radius + np.array([cx, cy])
    return [tuple(p) for p in pts]


def _shape_alpha(obj: WorldObject, angle: float) -> np.ndarray:
    """Anti-aliased coverage mask [H, W] in [0, 1] of one object (PIL polygon drawing at 4x, box-downsampled)."""
    s = _SUPERSAMPLE
    mask = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy, r = obj.x * s, obj.y * s, obj.size * s
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(_shape_polygon(obj.shape, cx, cy, r, angle), fill=255)
    mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(mask, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    """The real photos used for backgrounds, downscaled (shorter side 160 px), desaturated and contrast-squeezed."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    raw = [getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins")]
    raw += list(load_sample_images().images)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        raw.append(np.asarray(Image.open(handle).convert("RGB")))
    photos = []
    for array in raw:
        image = Image.fromarray(array).convert("RGB")
        scale = 160 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        x = np.asarray(image, dtype=np.float32)
        grey = x.mean(axis=2, keepdims=True)
        x = grey + _PHOTO_SATURATION * (x - grey)
        lo, hi = np.percentile(x, 2), np.percentile(x, 98)
        x = np.clip((x - lo) / max(hi - lo, 1.0), 0.0, 1.0)
        photos.append((_PHOTO_RANGE[0] + x * (_PHOTO_RANGE[1] - _PHOTO_RANGE[0])).astype(np.float32))
    return tuple(photos)


def _muted_tone(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(*_BG_LEVEL) + rng.uniform(-_BG_TINT, _BG_TINT, size=3)


def _background(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A float32 [H, W, 3] background in 0..255."""
    n = IMAGE_SIZE
    if kind == "solid":
        return np.broadcast_to(_muted_tone(rng), (n, n, 3)).astype(np.float32)
    if kind == "gradient":
        start, end = _muted_tone(rng), _muted_tone(rng)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:n, 0:n] / (n - 1) - 0.5
        t = np.clip(xx * np.cos(angle) + yy * np.sin(angle) + 0.5, 0.0, 1.0)[..., None]
        return (start * (1 - t) + end * t).astype(np.float32)
    if kind == "noise":
        # Smooth-ish noise: a coarse random field upsampled, plus fine grain.
        coarse_size = int(rng.integers(4, 17))
        coarse = rng.normal(0.0, 18.0, size=(coarse_size, coarse_size, 3)).astype(np.float32)
        coarse_img = [Image.fromarray(coarse[..., c], mode="F").resize((n, n), Image.Resampling.BICUBIC) for c in range(3)]
        field = np.stack([np.asarray(c) for c in coarse_img], axis=2)
        grain = rng.normal(0.0, 8.0, size=(n, n, 3))
        return np.clip(_muted_tone(rng) + field + grain, 60, 190).astype(np.float32)
    if kind == "photo":
        photos = _photos()
        photo = photos[int(rng.integers(len(photos)))]
        h, w = photo.shape[:2]
        crop = int(rng.integers(n, min(h, w) + 1))
        top, left = int(rng.integers(h - crop + 1)), int(rng.integers(w - crop + 1))
        patch = photo[top : top + crop, left : left + crop]
        if crop != n:
            channels = [Image.fromarray(patch[..., c], mode="F").resize((n, n), Image.Resampling.BILINEAR) for c in range(3)]
            patch = np.stack([np.asarray(c) for c in channels], axis=2)
        return np.ascontiguousarray(patch, dtype=np.float32)
    raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUNDS}")


def _place_objects(rng: np.random.Generator, n_objects: int) -> tuple[WorldObject, ...]:
    """Pick shapes, colours, sizes and non-overlapping positions (two objects sit on opposite sides)."""
    n = IMAGE_SIZE
    shape_ids = rng.choice(len(SHAPES), size=n_objects, replace=False)
    color_ids = rng.choice(len(COLORS), size=n_objects, replace=False)
    if n_objects == 1:
        size = rng.uniform(9.0, 20.0)
        margin = size + 1.0
        x, y = rng.uniform(margin, n - margin, size=2)
        return (WorldObject(SHAPES[shape_ids[0]], COLORS[color_ids[0]], round(size, 2), round(x, 2), round(y, 2)),)
    primary_size = rng.uniform(10.0, 15.0)
    secondary_size = primary_size * rng.uniform(0.5, 0.7)
    primary_left = bool(rng.integers(2))
    # Left object's centre in the left part, right object's in the right part; a gap keeps them apart.
    left_size, right_size = (primary_size, secondary_size) if primary_left else (secondary_size, primary_size)
    gap = left_size + right_size + 2.0
    left_x = rng.uniform(left_size + 1.0, min(n / 2 - 1.0, n - right_size - 1.0 - gap))
    right_x = rng.uniform(max(n / 2 + 1.0, left_x + left_size + right_size + 2.0), n - right_size - 1.0)
    xs = (left_x, right_x) if primary_left else (right_x, left_x)
    sizes = (primary_size, secondary_size)
    objects = []
    for i in range(2):
        y = rng.uniform(sizes[i] + 1.0, n - sizes[i] - 1.0)
        objects.append(
            WorldObject(SHAPES[shape_ids[i]], COLORS[color_ids[i]], round(sizes[i], 2), round(xs[i], 2), round(y, 2))
        )
    return tuple(objects)


def generate_world_image(
    seed: int | np.random.Generator | np.random.SeedSequence,
    n_objects: int | None = None,
    background: str | None = None,
) -> WorldImage:
    """Draw one 64x64 world image. The same ``seed`` (int or SeedSequence) always gives the same pixels.

    ``n_objects`` (1 or 2) and ``background`` (one of :data:`BACKGROUNDS`) are drawn from the generator unless given.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if n_objects is None:
        n_objects = 2 if rng.random() < _TWO_OBJECT_PROBABILITY else 1
    if n_objects not in (1, 2):
        raise ValueError(f"n_objects must be 1 or 2, got {n_objects}")
    if background is None:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    pixels = _background(background, rng)
    objects = _place_objects(rng, n_objects)
    for obj in objects:
        angle = rng.uniform(-0.25, 0.25)
        alpha = _shape_alpha(obj, angle)[..., None]
        colour = np.array(COLOR_RGB[obj.color], dtype=np.float32) + rng.uniform(-12, 12, size=3)
        # Mild top-to-bottom shading so objects are not perfectly flat.
        shade = 1.0 + rng.uniform(0.0, 0.12) * np.linspace(0.5, -0.5, IMAGE_SIZE, dtype=np.float32)[:, None, None]
        pixels = pixels * (1.0 - alpha) + np.clip(colour * shade, 0, 255) * alpha
    pixels = pixels + rng.normal(0.0, 2.0, size=pixels.shape)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")
    return WorldImage(image=image, objects=objects, background=background)


# ---------------------------------------------------------------------------------------------- language


_BACKGROUND_WORDS = {"solid": "plain", "gradient": "gradient", "noise": "noisy", "photo": "photo"}


def _side(obj: WorldObject) -> str:
    return "left" if obj.x < IMAGE_SIZE / 2 else "right"


def _region(obj: WorldObject) -> str:
    """Coarse position of a single object, e.g. 'top left', 'center', 'bottom'."""
    third = IMAGE_SIZE / 3
    vertical = "top" if obj.y < third else "bottom" if obj.y > 2 * third else ""
    horizontal = "left" if obj.x < third else "right" if obj.x > 2 * third else ""
    return " ".join(w for w in (vertical, horizontal) if w) or "center"


def captions_for(world: WorldImage) -> list[str]:
    """Five reference captions, varied in wording and detail (all mention the primary object first)."""
    p = world.objects[0]
    bg = _BACKGROUND_WORDS[world.background]
    if len(world.objects) == 1:
        size_word = "large" if p.size >= 15 else "small" if p.size < 12 else "medium"
        return [
            f"a {p.color} {p.shape}",
            f"a photo of a {p.color} {p.shape}",
            f"a {size_word} {p.color} {p.shape} on a {bg} background",
            f"a {p.color} {p.shape} in the {_region(p)} of the image",
            f"there is one {p.color} {p.shape} in the picture",
        ]
    s = world.objects[1]
    return [
        f"a {p.color} {p.shape} and a small {s.color} {s.shape}",
        f"a photo of a {p.color} {p.shape} next to a {s.color} {s.shape}",
        f"a large {p.color} {p.shape} to the {_side(p)} of a small {s.color} {s.shape}",
        f"two objects on a {bg} background: a {p.color} {p.shape} and a {s.color} {s.shape}",
        f"a {s.color} {s.shape} on the {_side(s)} and a bigger {p.color} {p.shape} on the {_side(p)}",
    ]


def questions_for(world: WorldImage) -> tuple[list[str], list[str]]:
    """Parallel question/answer lists; every answer is one lower-case word and unambiguous for the image."""
    p = world.objects[0]
    qa: list[tuple[str, str]] = []
    if len(world.objects) == 1:
        qa += [
            (f"What color is the {p.shape}?", p.color),
            ("What shape is in the image?", p.shape),
            (f"What shape is the {p.color} object?", p.shape),
            ("How many objects are there?", NUMBER_WORDS[1]),
        ]
        return [q for q, _ in qa], [a for _, a in qa]
    s = world.objects[1]
    left, right = (p, s) if _side(p) == "left" else (s, p)
    qa += [
        (f"What color is the {p.shape}?", p.color),
        (f"What shape is the {p.color} object?", p.shape),
        ("How many objects are there?", NUMBER_WORDS[2]),
        (f"What color is the {s.shape}?", s.color),
        (f"What shape is the {s.color} object?", s.shape),
        ("What shape is on the left?", left.shape),
        ("What color is the object on the right?", right.color),
        (f"Is the {p.color} {p.shape} on the left or on the right?", _side(p)),
        ("What shape is the larger object?", p.shape),
    ]
    return [q for q, _ in qa], [a for _, a in qa]


def world_vocabulary() -> list[str]:
    """Every lower-case word the captions, class prompts and questions can use (for the WorldCLIP tokenizer)."""
    words = set(CLASS_PROMPT_TEMPLATE.format("").split())
    words |= set(COLORS) | set(SHAPES) | set(NUMBER_WORDS.values()) | set(_BACKGROUND_WORDS.values())
    templates = (
        "a photo of a large small medium on background in the of image there is one picture and next to"
        " two objects bigger left right top bottom center what color shape is how many are larger object or"
    )
    words |= set(templates.split())
    return sorted(words)


# ----------------------------------------------------------------------------------------------- dataset


def _split_code(split: str) -> int:
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLIT_SIZES)}")
    return list(SPLIT_SIZES).index(split)


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The per-image seed: images in different splits (or with different dataset seeds) never share a stream."""
    return np.random.SeedSequence([GENERATOR_VERSION, seed, _split_code(split), index])


def world_record(world: WorldImage, image_id: str) -> dict:
    """One dataset row (PNG-encoded image) for a generated image."""
    buffer = io.BytesIO()
    world.image.save(buffer, format="PNG")
    questions, answers = questions_for(world)
    primary = world.objects[0]
    return {
        "id": image_id,
        "image": {"bytes": buffer.getvalue(), "path": None},
        "label": world.label,
        "color": primary.color,
        "shape": primary.shape,
        "objects": [asdict(o) for o in world.objects],
        "background": world.background,
        "captions": captions_for(world),
        "questions": questions,
        "answers": answers,
    }


def _features():
    from datasets import ClassLabel, Features, Image as ImageFeature, List, Value

    obj = {"shape": Value("string"), "color": Value("string"), "size": Value("float32"), "x": Value("float32"), "y": Value("float32")}
    return Features(
        {
            "id": Value("string"),
            "image": ImageFeature(),
            "label": ClassLabel(names=CLASS_NAMES),
            "color": Value("string"),
            "shape": Value("string"),
            "objects": List(obj),
            "background": Value("string"),
            "captions": List(Value("string")),
            "questions": List(Value("string")),
            "answers": List(Value("string")),
        }
    )


def world_cache_dir() -> Path:
    """Where generated splits are cached: ``$ADPO_CACHE/world/data`` or ``~/.cache/adpo/world/data``."""
    root = os.environ.get("ADPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "adpo")
    return Path(root) / "world" / "data"


def generate_split(split: str, seed: int = 0, n: int | None = None, progress: bool = True):
    """Generate (without caching) the first ``n`` rows of a split as a ``datasets.Dataset``."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    total = SPLIT_SIZES[split] if n is None else n
    rows = []
    for index in tqdm(range(total), desc=f"world {split} images", disable=not progress, leave=False):
        world = generate_world_image(image_seed(seed, split, index))
        rows.append(world_record(world, f"{split}-{seed}-{index:05d}"))
    columns = {key: [row[key] for row in rows] for key in _features()}
    return Dataset.from_dict(columns, features=_features())


def load_world_dataset(split: str = "test", n: int | None = None, seed: int = 0, progress: bool = True):
    """The world's ``split`` ("train", "val" or "test") as a ``datasets.Dataset``, optionally its first ``n`` rows.

    Splits are fixed by ``seed`` and cached on disk (keyed by generator version and seed), so repeated calls are
    fast and byte-identical.
    """
    from datasets import load_from_disk

    _split_code(split)
    if n is not None and not 0 <= n <= SPLIT_SIZES[split]:
        raise ValueError(f"n={n} is outside the {split} split (0..{SPLIT_SIZES[split]} rows)")
    target = world_cache_dir() / f"v{GENERATOR_VERSION}-seed{seed}" / split
    if not (target / "dataset_info.json").exists():
        dataset = generate_split(split, seed=seed, progress=progress)
        with atomic_directory(target) as staging:  # a process that finished the same split first wrote the same bytes
            dataset.save_to_disk(str(staging))
    dataset = load_from_disk(str(target))
    return dataset if n is None else dataset.select(range(n))


def dataset_fingerprint(dataset) -> str:
    """SHA-256 over the PNG bytes of every image (for determinism checks)."""
    from datasets import Image as ImageFeature

    digest = hashlib.sha256()
    for item in dataset.cast_column("image", ImageFeature(decode=False))["image"]:
        digest.update(item["bytes"])
    return digest.hexdigest()

