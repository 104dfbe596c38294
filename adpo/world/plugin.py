"""The bundled world as an adpo plugin (published in pyproject.toml under the ``adpo.plugins`` entry points): the names
``world:small`` / ``world:large`` (LVLMs), ``world:clip`` (WorldCLIP), the data ``world`` / ``world:<split>`` /
``world:<split>@<seeds>`` (that split of several seeds' worlds, e.g. ``world:train@0-7``), the radius ``world`` (the
working ε in world.yaml) and the ``adpo world`` command. Everything heavy is imported on use."""

from __future__ import annotations

from adpo.plugins import Plugin

LVLM_NAMES = ("small", "large")
CLIP_NAME = "clip"


def _model_kind(name: str) -> str:
    return "clip" if name == CLIP_NAME else "lvlm"


def _load_lvlm(name: str, dtype=None):
    import torch

    from adpo.world.lvlm import load_world_lvlm

    return load_world_lvlm(name, dtype=dtype or torch.float32)


def _load_clip(name: str):
    from adpo.world.clip import load_world_clip

    return load_world_clip()


def _model_identity(name: str) -> str:
    from adpo.world.lvlm import world_model_key

    return f"world-{world_model_key(name)}"


def _open_source(spec: str | None, n: int | None):
    from adpo.world.source import WorldSource, parse_world_split

    split, seeds = parse_world_split(spec)
    return WorldSource(split, n=n, seeds=seeds)


def _check_data(spec: str | None) -> None:
    from adpo.world.data import SPLIT_SIZES
    from adpo.world.source import parse_world_split

    split, _ = parse_world_split(spec)
    if split not in SPLIT_SIZES:
        raise ValueError(f"the world has no split {split!r}; its splits are {', '.join(SPLIT_SIZES)}")


def _working_eps() -> float:
    from adpo.world import world_config

    return float(world_config()["working_eps"])


PLUGIN = Plugin(
    scheme="world",
    summary="the bundled offline world: build | info | prune | eval | merge",
    model_names=(*LVLM_NAMES, CLIP_NAME),
    model_kind=_model_kind,
    load_lvlm=_load_lvlm,
    load_clip=_load_clip,
    model_identity=_model_identity,
    open_source=_open_source,
    check_data=_check_data,
    radius=_working_eps,
    default_data="world",
    command="adpo.world.cli",
)
