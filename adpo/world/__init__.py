"""The bundled world: procedural images, WorldCLIP, and two real LLaVA models (small: SmolLM2-135M-Instruct,
large: Gemma-3-270M) on WorldCLIP's vision tower — the offline stand-in for CLIP + LLaVA-1.5.

Entry points::

    model, processor = load_world_lvlm("small")      # plain LlavaForConditionalGeneration + LlavaProcessor
    prompt = prompt_for("What color is the circle?", processor)
    world_config()["working_eps"]                     # the eps later stages default to
    build_world(stages=["small", "large"])            # retrain shipped weights (``adpo world build``)

It plugs into the core as the ``world`` scheme (``world:small``, ``world:large``, ``world:clip``, data
``world:<split>``, the radius ``world``) through :mod:`adpo.world.plugin`. See docs/world.md.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Any

WORLD_CONFIG_PATH = Path(__file__).resolve().parent / "world.yaml"

# Exported names and their modules, imported on first use: the plugin registry imports this package to read the
# world's plugin, and that must not cost the import of torch and the LMs.
_LAZY_EXPORTS = {
    "CLASS_NAMES": "adpo.world.data", "COLORS": "adpo.world.data", "SHAPES": "adpo.world.data",
    "load_world_dataset": "adpo.world.data", "MissingLMPackageError": "adpo.world.lm", "load_lm": "adpo.world.lm",
    "SIZES": "adpo.world.lvlm", "load_world_lvlm": "adpo.world.lvlm", "prompt_for": "adpo.world.lvlm",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY_EXPORTS:
        raise AttributeError(f"module 'adpo.world' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)


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


__all__ = [*_LAZY_EXPORTS, "build_world", "world_config"]
