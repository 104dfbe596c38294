"""The bundled world: procedural images, WorldCLIP, and two real LLaVA models (small: SmolLM2-135M-Instruct,
large: Gemma-3-270M) on WorldCLIP's vision tower — the offline stand-in for CLIP + LLaVA-1.5.

Entry points::

    model, processor = load_world_lvlm("small")      # plain LlavaForConditionalGeneration + LlavaProcessor
    prompt = prompt_for("What color is the circle?", processor)
    world_config()["working_eps"]                     # the eps later stages default to
    build_world(stages=["small", "large"])            # retrain shipped weights (``adpo world build``)

See docs/world.md.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from adpo.world.data import CLASS_NAMES, COLORS, SHAPES, load_world_dataset
from adpo.world.lm import MissingLMPackageError, load_lm
from adpo.world.lvlm import SIZES, load_world_lvlm, prompt_for

WORLD_CONFIG_PATH = Path(__file__).resolve().parent / "world.yaml"


@lru_cache(maxsize=1)
def _read_world_config(path: str, mtime: float) -> dict:
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def world_config() -> dict:
    """The world's settings and measured metrics from ``adpo/world/world.yaml`` (image_size, working_eps, ...)."""
    if not WORLD_CONFIG_PATH.is_file():
        raise FileNotFoundError(f"{WORLD_CONFIG_PATH} is missing; restore it from git or rerun `adpo world eval`.")
    return dict(_read_world_config(str(WORLD_CONFIG_PATH), WORLD_CONFIG_PATH.stat().st_mtime))


def build_world(out_dir=None, stages=("clip", "small", "large"), **kwargs):
    """Rebuild the shipped weights (see :func:`adpo.world.build.build_world`)."""
    from adpo.world.build import build_world as _build_world

    return _build_world(out_dir=out_dir, stages=stages, **kwargs)


__all__ = [
    "CLASS_NAMES",
    "COLORS",
    "SHAPES",
    "SIZES",
    "MissingLMPackageError",
    "build_world",
    "load_lm",
    "load_world_dataset",
    "load_world_lvlm",
    "prompt_for",
    "world_config",
]
