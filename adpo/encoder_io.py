"""The encoder interchange format: a vision tower as a standalone ``CLIPVisionModel`` directory (config, safetensors,
preprocessor, card), written and read whatever the checkpoint's key layout (LLaVA's ``model.vision_tower.*``, older
``vision_model.*``, transformers 5.x flat keys), and put into or taken out of an LVLM."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from adpo.io import atomic_directory
from adpo.preprocess import image_processor_of
from adpo.runtime import ENCODER_DIRNAME
from adpo.tower import find_vision_tower

# Key prefixes under which a CLIP vision tower's weights appear in LLaVA checkpoints and in older
# transformers layouts; stripping them gives the layout of a standalone CLIPVisionModel.
_ENCODER_PREFIXES = ("model.vision_tower.", "vision_tower.", "vision_model.")


def canonical_encoder_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tower weights in the key layout of a standalone ``CLIPVisionModel`` (transformers 5.x).

    Accepts full LLaVA state dicts (``model.vision_tower.*``; other keys are dropped), older tower layouts
    (``vision_model.*``) and canonical ones. Non-persistent buffers (``position_ids``) are dropped.
    """
    has_tower_prefix = any(k.startswith(("model.vision_tower.", "vision_tower.")) for k in state_dict)
    canonical = {}
    for key, value in state_dict.items():
        if has_tower_prefix and not key.startswith(("model.vision_tower.", "vision_tower.")):
            continue
        for prefix in _ENCODER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith("vision_model."):
            key = key[len("vision_model."):]
        if key.endswith("position_ids"):
            continue
        canonical[key] = value
    return canonical


def export_encoder(model: nn.Module) -> CLIPVisionModel:
    """A standalone copy of the model's vision tower as a ``CLIPVisionModel``."""
    tower = find_vision_tower(model)
    if isinstance(tower, CLIPVisionModel):
        return copy.deepcopy(tower)
    config = CLIPVisionConfig(**{k: v for k, v in tower.config.to_dict().items() if k in CLIPVisionConfig().to_dict()})
    encoder = CLIPVisionModel(config)
    put_encoder(encoder, tower.state_dict())
    return encoder.to(next(tower.parameters()).dtype)


def put_encoder(model: nn.Module, source: nn.Module | dict[str, torch.Tensor] | str | os.PathLike) -> None:
    """Load encoder weights into ``model``'s vision tower (in place), whatever their key layout.

    ``source``: a module, a state dict, or a ``CLIPVisionModel`` directory. Missing, unexpected and
    mis-shaped keys are refused with their names.
    """
    if isinstance(source, (str, os.PathLike)):
        source = load_encoder(source)
    state = source.state_dict() if isinstance(source, nn.Module) else source
    state = canonical_encoder_state(state)
    tower = find_vision_tower(model)
    target = canonical_encoder_state(tower.state_dict())
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    mismatched = [f"{k}: {tuple(state[k].shape)} vs tower {tuple(target[k].shape)}" for k in target if k in state and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            problems.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if mismatched:
            problems.append(f"shape mismatches: {mismatched[:3]}")
        raise ValueError(
            "encoder weights do not fit this model's vision tower: " + "; ".join(problems)
            + ". Check the encoder geometry with `adpo transfer` (it reports and fixes what it can)."
        )
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in tower.state_dict()) else ""
    reference = tower.state_dict()
    tower.load_state_dict({prefix + k: v.to(reference[prefix + k].dtype) for k, v in state.items()}, strict=True)


def encoder_location(path: str | os.PathLike) -> str:
    """Where the encoder behind ``path`` lies: a trainer's run or checkpoint directory stands for the encoder it
    wrote in ``encoder/`` (``adpo.runtime.ENCODER_DIRNAME``); anything else (an encoder directory, a hub id) is
    itself."""
    location = Path(path).expanduser()
    nested = location / ENCODER_DIRNAME
    if not (location / "config.json").exists() and (nested / "config.json").exists():
        return os.fspath(nested)
    return os.fspath(path)


def check_weight_files(directory: str | os.PathLike) -> None:
    """Refuse a local model directory whose ``*.safetensors`` file is truncated or garbage, with one line naming the
    file and how to re-create it (from_pretrained fails on one deep inside safetensors, naming no file).
    Reads only each file's header; a hub id (no such directory) is left to from_pretrained."""
    from safetensors import SafetensorError, safe_open

    from adpo.errors import UsageError

    for file in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise UsageError(f"{file} is corrupt or truncated ({str(error).splitlines()[0]}); re-create it by re-running "
                             "the training or export that wrote it, or download it again") from None


def load_encoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> CLIPVisionModel:
    """Load an encoder saved in the interchange format (or any CLIPVisionModel directory / hub id, or a trainer's
    run directory holding one in ``encoder/``).

    Refuses a checkpoint with missing or unexpected weights (from_pretrained would otherwise initialise
    them randomly and only log it), so a broken encoder can never be grafted or evaluated silently.
    """
    path = encoder_location(path)
    check_weight_files(path)
    encoder, info = CLIPVisionModel.from_pretrained(path, dtype=dtype, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"encoder checkpoint {path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "re-export it with adpo.encoder_io.save_encoder or convert it with `adpo transfer convert`"
        )
    return encoder


def save_encoder(encoder: nn.Module, out_dir: str | os.PathLike, image_processor: Any = None, card: dict | None = None) -> Path:
    """Write ``encoder`` as a CLIPVisionModel directory (config + safetensors + preprocessor + card), atomically.

    ``card`` (JSON-serialisable) records how it was trained and its measured robustness; it is stored as
    ``adpo_card.json`` and rendered into the directory's ``README.md``.
    """
    if not isinstance(encoder, CLIPVisionModel):
        standalone = CLIPVisionModel(encoder.config)
        put_encoder(standalone, encoder.state_dict())
        encoder = standalone
    card = dict(card or {})
    with atomic_directory(out_dir) as staging:
        encoder.save_pretrained(staging, safe_serialization=True)
        if image_processor is not None:
            image_processor_of(image_processor).save_pretrained(staging)
        (staging / "adpo_card.json").write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
        (staging / "README.md").write_text(_render_card(card))
    return Path(out_dir)


def _render_card(card: dict) -> str:
    lines = ["---", "library_name: transformers", "tags: [clip, adversarial-robustness, adpo]", "---", "",
             "# Robust CLIP vision encoder", "",
             "A `CLIPVisionModel` written by adpo; load it with `CLIPVisionModel.from_pretrained(path)` or graft it "
             "into an LVLM with `adpo transfer`.", ""]
    if card:
        lines += ["| field | value |", "| --- | --- |"]
        lines += [f"| {key} | {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value} |" for key, value in sorted(card.items())]
    return "\n".join(lines) + "\n"
