"""Graft a donor CLIP encoder into a LLaVA-family LVLM and save the result with a graft report.

The donor is an encoder directory (the interchange format), an open_clip state-dict file, or another
LVLM whose tower is exported. The graft checks geometry (:mod:`transfer.geometry`), applies only the
fixes explicitly allowed, replaces the tower weights in place, and proves that nothing else moved:
per-component parameter hashes before and after, and the tower's weights equal to the prepared donor's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from transformers import CLIPVisionModel
from transformers.activations import ACT2FN

from adpo.encoder_io import canonical_encoder_state, put_encoder
from adpo.io import atomic_directory
from adpo.models import load_vision_encoder
from adpo.tower import find_vision_tower
from transfer.geometry import (
    GeometryReport,
    GraftOptions,
    TowerGeometry,
    adapt_donor_state,
    check_geometry,
    vision_config_updates,
)

REPORT_JSON, REPORT_MD = "graft_report.json", "graft_report.md"
COMPONENTS = ("vision_tower", "projector", "language_model")
# how a graft report names each kind of source adpo.models reads an encoder from
DONOR_KINDS = {"clip_vision_model": "encoder directory", "clip": "clip model tower", "lvlm": "lvlm tower", "open_clip": "open_clip state dict"}


@dataclass
class Donor:
    """An encoder to graft, with what is known about how it expects its input."""

    encoder: CLIPVisionModel
    image_mean: list[float] | None
    image_std: list[float] | None
    image_processor: Any = None  # the donor's own resize/crop, when it came with one (verification uses it)
    source: dict = field(default_factory=dict)

    def geometry(self) -> TowerGeometry:
        geometry = TowerGeometry.from_encoder(self.encoder)
        geometry.image_mean, geometry.image_std = self.image_mean, self.image_std
        return geometry


def load_donor(
    source: str | os.PathLike,
    *,
    activation: str | None = None,
    num_attention_heads: int | None = None,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> Donor:
    """Load a donor from an encoder directory, an open_clip checkpoint file, or an LVLM (a
    LLaVA directory or hub id, a plugin's LVLM) whose tower is exported. ``activation``/``num_attention_heads`` are needed
    for open_clip files only; ``image_mean``/``image_std`` override what the donor ships. A trainer's run
    directory stands for the encoder it wrote in ``encoder/``."""
    loaded = load_vision_encoder(source, activation=activation, num_attention_heads=num_attention_heads)
    record = {**loaded.record, "kind": DONOR_KINDS[loaded.kind]}
    processor = loaded.image_processor
    mean = list(image_mean) if image_mean is not None else (list(processor.image_mean) if processor else None)
    std = list(image_std) if image_std is not None else (list(processor.image_std) if processor else None)
    record["parameters_sha256"] = state_hash(loaded.encoder.state_dict())
    return Donor(loaded.encoder.float().eval(), mean, std, processor, record)


# ------------------------------------------------------------------------------------------- hashing


def tensor_digest(tensor: torch.Tensor) -> bytes:
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).digest()


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    total = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        total.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        total.update(tensor_digest(tensor))
    return total.hexdigest()


def component_of(name: str) -> str:
    if "vision_tower" in name:
        return "vision_tower"
    if "multi_modal_projector" in name:
        return "projector"
    return "language_model"


def component_hashes(model: nn.Module) -> dict[str, str]:
    """One hash per component (vision tower, projector, language model incl. LM head) of ``model``.

    The tower is hashed under standalone-encoder key names, so its hash equals that of the same weights
    saved as an encoder (the donor's ``parameters_sha256`` when grafted unchanged in the same dtype)."""
    parts: dict[str, dict[str, torch.Tensor]] = {component: {} for component in COMPONENTS}
    for name, tensor in model.state_dict().items():
        parts[component_of(name)][name] = tensor
    parts["vision_tower"] = canonical_encoder_state(parts["vision_tower"])
    return {component: state_hash(state) for component, state in parts.items()}


# --------------------------------------------------------------------------------------------- graft


@dataclass
class GraftOutcome:
    geometry: GeometryReport
    hashes_before: dict[str, str]
    hashes_after: dict[str, str]
    donor_prepared_sha256: str
    vision_config_updates: dict[str, Any]

    def to_dict(self) -> dict:
        return {
            "checks": self.geometry.to_dict(),
            "fixes_applied": self.geometry.fixed,
            "vision_config_updates": self.vision_config_updates,
            "parameter_hashes": {"before": self.hashes_before, "after": self.hashes_after,
                                 "donor_prepared_tower": self.donor_prepared_sha256},
        }


def check_donor(model: nn.Module, processor: Any, donor: Donor, options: GraftOptions | None = None) -> GeometryReport:
    """The geometry report of grafting ``donor`` into ``model`` (nothing is changed)."""
    return check_geometry(donor.geometry(), TowerGeometry.from_lvlm(model, processor), options)


def graft_encoder(model: nn.Module, processor: Any, donor: Donor, options: GraftOptions | None = None) -> GraftOutcome:
    """Replace ``model``'s tower weights with the donor's, in place. Raises
    :class:`~transfer.geometry.GeometryMismatch` (nothing changed) when the donor does not fit."""
    donor_geometry, target_geometry = donor.geometry(), TowerGeometry.from_lvlm(model, processor)
    report = check_geometry(donor_geometry, target_geometry, options)
    report.raise_if_incompatible()
    hashes_before = component_hashes(model)
    state = adapt_donor_state(canonical_encoder_state(donor.encoder.state_dict()), donor_geometry, target_geometry, report)
    updates = vision_config_updates(donor_geometry, report)
    tower = find_vision_tower(model)
    put_encoder(model, state)
    _apply_config_updates(model, tower, updates)
    hashes_after = component_hashes(model)
    # The graft must touch the tower and nothing else, and leave exactly the prepared donor weights in it.
    moved = [c for c in ("projector", "language_model") if hashes_before[c] != hashes_after[c]]
    if moved:
        raise RuntimeError(f"grafting changed parameters outside the vision tower: {moved}")
    tower_dtype = next(tower.parameters()).dtype
    prepared = {k: v.to(tower_dtype) for k, v in state.items()}
    if state_hash(prepared) != hashes_after["vision_tower"]:
        raise RuntimeError("the grafted tower's weights differ from the prepared donor weights")
    return GraftOutcome(report, hashes_before, hashes_after, state_hash(prepared), updates)


def _apply_config_updates(model: nn.Module, tower: nn.Module, updates: dict[str, Any]) -> None:
    """Write adopted activation / eps into the config and into the already-built modules."""
    if not updates:
        return
    for config in {id(c): c for c in (model.config.vision_config, tower.config)}.values():
        for key, value in updates.items():
            setattr(config, key, value)
    for module in tower.modules():
        if "hidden_act" in updates and hasattr(module, "activation_fn"):
            module.activation_fn = ACT2FN[updates["hidden_act"]]
        if "layer_norm_eps" in updates and isinstance(module, nn.LayerNorm):
            module.eps = updates["layer_norm_eps"]


# ---------------------------------------------------------------------------------------------- save


def save_grafted(
    model: nn.Module, processor: Any, out_dir: str | os.PathLike, report: dict, overwrite: bool = False
) -> Path:
    """Write a complete model directory (``save_pretrained`` + processor + graft report), atomically.

    It is assembled under a temporary name beside ``out_dir`` and renamed into place, so a crash never
    leaves a half-written model where a complete one is expected.
    """
    out = Path(out_dir)
    ensure_writable(out, overwrite)
    with atomic_directory(out, overwrite=overwrite) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        (staging / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str))
        (staging / REPORT_MD).write_text(render_report(report))
    return out


def ensure_writable(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")


def render_report(report: dict) -> str:
    """The graft report as Markdown."""
    lines = ["# Graft report", ""]
    donor, target = report.get("donor", {}), report.get("target", {})
    lines += [f"- donor: `{donor.get('source')}` ({donor.get('kind', '?')})",
              f"- target: `{target.get('source')}`", f"- output: `{report.get('out_dir')}`", ""]
    graft = report.get("graft", {})
    lines += ["## Geometry checks", "", "| check | donor | target | status | note |", "| --- | --- | --- | --- | --- |"]
    for check in graft.get("checks", []):
        note = check["message"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {check['name']} | {check['donor']} | {check['target']} | {check['status']} | {note} |")
    if graft.get("vision_config_updates"):
        lines += ["", f"vision_config updated: `{graft['vision_config_updates']}`"]
    hashes = graft.get("parameter_hashes", {})
    if hashes:
        lines += ["", "## Parameter hashes (sha256)", "", "| component | before | after | changed |", "| --- | --- | --- | --- |"]
        for component in COMPONENTS:
            before, after = hashes["before"][component], hashes["after"][component]
            lines.append(f"| {component} | `{before[:16]}` | `{after[:16]}` | {'yes' if before != after else 'no'} |")
        lines.append(f"\ndonor tower as grafted: `{hashes['donor_prepared_tower'][:16]}`")
    verification = report.get("verification")
    if verification:
        lines += ["", "## Verification", "", render_verification(verification)]
    realignment = report.get("realignment")
    if realignment:
        lines += ["", "## Projector re-alignment (reported separately from the plain graft)", "",
                  render_verification(realignment)]
    return "\n".join(lines) + "\n"


def render_verification(section: dict) -> str:
    lines = ["| measure | value |", "| --- | --- |"]
    for key, value in section.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
        elif isinstance(value, (str, bool)) or value is None:
            lines.append(f"| {key} | {value} |")
    return "\n".join(lines)


def grafted_summary(outcome: GraftOutcome, donor: Donor, target: str, out_dir: str | os.PathLike) -> dict:
    """The report skeleton: source, target, checks and hashes (verification is added by the caller)."""
    return {"donor": donor.source, "target": {"source": target}, "out_dir": os.fspath(out_dir),
            "graft": outcome.to_dict()}

