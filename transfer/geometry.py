"""Is a donor encoder a drop-in replacement for a target LVLM's vision tower? And the explicit fixes.

A graft only keeps its meaning when the donor computes what the target's projector and LLM expect.
Some mismatches break loading (hidden size, patch size, MLP width); others load fine and silently
ruin the model (head count, activation, layer-norm eps, normalisation constants, a layer count that
moves a negative feature layer). Every property is compared here, each mismatch gets its own message
naming both values and what would fix it, and the fixable ones are fixed only when asked:

* ``interpolate_positions``: resample the donor's position embeddings bicubically over the patch grid
  (CLS position kept), e.g. a 224 px FARE encoder into LLaVA-1.5's 336 px tower.
* ``fold_normalisation``: fold the difference between the donor's and the target's mean/std into the
  patch embedding (scale) and the patch position embeddings (shift) — exact, and the target's
  processor stays as it is.
* ``adopt_donor_activation`` / ``adopt_donor_layer_norm_eps``: run the grafted tower with the donor's
  setting (written into the grafted model's ``vision_config``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adpo.encoder_io import canonical_encoder_state
from adpo.preprocess import image_processor_of
from adpo.tower import feature_selection, find_vision_tower

NORMALISATION_TOLERANCE = 1e-6


@dataclass
class GraftOptions:
    """Explicit permissions to fix a mismatch (all off: any mismatch refuses the graft)."""

    interpolate_positions: bool = False
    fold_normalisation: bool = False
    adopt_donor_activation: bool = False
    adopt_donor_layer_norm_eps: bool = False


@dataclass
class TowerGeometry:
    """What a vision tower computes, read from its weights, config and image processor."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int
    image_size: int
    num_positions: int
    hidden_act: str
    layer_norm_eps: float
    image_mean: list[float] | None = None  # None: unknown (a bare checkpoint without a preprocessor config)
    image_std: list[float] | None = None
    feature_layer: int | list[int] | None = None  # what the LLM reads (targets only)
    select_strategy: str | None = None

    @classmethod
    def from_encoder(
        cls, encoder: nn.Module, image_processor: Any = None, feature_layer: int | list[int] | None = None,
        select_strategy: str | None = None,
    ) -> "TowerGeometry":
        config = encoder.config
        state = canonical_encoder_state(encoder.state_dict())
        if "embeddings.class_embedding" not in state or "embeddings.position_embedding.weight" not in state:
            raise ValueError(
                f"{type(encoder).__name__} is not a CLIP vision tower (no class/position embedding); adpo transfer "
                "grafts CLIP ViT towers (LLaVA-1.5 family)"
            )
        positions = state["embeddings.position_embedding.weight"]
        patch = state["embeddings.patch_embedding.weight"]
        layers = {key.split(".")[2] for key in state if key.startswith("encoder.layers.")}
        processor = image_processor_of(image_processor) if image_processor is not None else None
        return cls(
            hidden_size=int(positions.shape[1]),
            intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
            num_layers=len(layers),
            num_heads=int(config.num_attention_heads),
            patch_size=int(patch.shape[-1]),
            image_size=int(config.image_size),
            num_positions=int(positions.shape[0]),
            hidden_act=str(config.hidden_act),
            layer_norm_eps=float(config.layer_norm_eps),
            image_mean=None if processor is None else [float(v) for v in processor.image_mean],
            image_std=None if processor is None else [float(v) for v in processor.image_std],
            feature_layer=feature_layer,
            select_strategy=select_strategy,
        )

    @classmethod
    def from_lvlm(cls, model: nn.Module, processor: Any) -> "TowerGeometry":
        feature_layer, select_strategy = feature_selection(model)
        return cls.from_encoder(find_vision_tower(model), processor, feature_layer=feature_layer, select_strategy=select_strategy)

    def feature_depths(self) -> list[int]:
        """Index into the hidden states (0 = embeddings, i = output of layer i) of each feature layer."""
        layers = self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]
        return [layer if layer >= 0 else self.num_layers + 1 + layer for layer in layers if layer is not None]


@dataclass
class Check:
    name: str
    donor: Any
    target: Any
    status: str  # "ok" | "fixed" | "mismatch" | "assumed"
    message: str = ""


@dataclass
class GeometryReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def mismatches(self) -> list[Check]:
        return [check for check in self.checks if check.status == "mismatch"]

    @property
    def fixed(self) -> list[str]:
        return [check.name for check in self.checks if check.status == "fixed"]

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def raise_if_incompatible(self) -> None:
        if self.mismatches:
            raise GeometryMismatch(self)

    def to_dict(self) -> list[dict]:
        return [asdict(check) for check in self.checks]


class GeometryMismatch(ValueError):
    """The donor cannot replace the target's tower as it stands; the message lists every mismatch and its fix."""

    def __init__(self, report: GeometryReport):
        self.report = report
        lines = [f"  - {check.name}: {check.message}" for check in report.mismatches]
        super().__init__("the donor encoder does not fit the target's vision tower:\n" + "\n".join(lines))


def check_geometry(donor: TowerGeometry, target: TowerGeometry, options: GraftOptions | None = None) -> GeometryReport:
    """Compare donor and target property by property; fixable mismatches are "fixed" only if ``options`` allow."""
    options = options or GraftOptions()
    report = GeometryReport()

    def add(name: str, donor_value: Any, target_value: Any, problem: str, fixed_by: bool = False, fixed: str = "") -> None:
        if donor_value == target_value:
            report.checks.append(Check(name, donor_value, target_value, "ok"))
        elif fixed_by:
            report.checks.append(Check(name, donor_value, target_value, "fixed", fixed))
        else:
            report.checks.append(Check(name, donor_value, target_value, "mismatch", problem))

    add("hidden size", donor.hidden_size, target.hidden_size,
        f"donor {donor.hidden_size}, target tower {target.hidden_size}. The projector consumes "
        f"{target.hidden_size}-dim features; no weight-preserving fix exists: use a donor of the target's "
        "architecture (LLaVA-1.5: CLIP ViT-L/14) or train a new projector for this encoder.")
    add("MLP width", donor.intermediate_size, target.intermediate_size,
        f"donor intermediate_size {donor.intermediate_size}, target tower {target.intermediate_size}: a different "
        "ViT architecture; use a donor of the target's architecture.")
    add("attention heads", donor.num_heads, target.num_heads,
        f"donor {donor.num_heads}, target tower {target.num_heads}. The q/k/v weights have the same shape either "
        "way, so the graft would load and silently compute different attention. If the donor's config is wrong "
        f"(e.g. an open_clip conversion), re-convert with num_attention_heads={target.num_heads}; otherwise the "
        "donor is a different architecture.")
    add("patch size", donor.patch_size, target.patch_size,
        f"donor {donor.patch_size} px, target tower {target.patch_size} px: the patch embedding and the number of "
        "image tokens differ; use a donor with the target's patch size.")
    depths = target.feature_depths()
    depth_text = ", ".join(f"hidden state {d} (layer {d} of {target.num_layers})" for d in depths) or "the last layer"
    too_shallow = bool(depths) and donor.num_layers < max(depths)
    add("layers", donor.num_layers, target.num_layers,
        f"donor {donor.num_layers}, target tower {target.num_layers}; the LLM reads feature layer "
        f"{target.feature_layer} = {depth_text}. "
        + ("The donor is too shallow to provide it." if too_shallow else
           "The layer that feature index selects would differ between the two.")
        + " Use a donor with the target's depth.")
    grid_d, grid_t = math.isqrt(donor.num_positions - 1), math.isqrt(target.num_positions - 1)
    add("image size / positions",
        f"{donor.image_size} px, {donor.num_positions} positions",
        f"{target.image_size} px, {target.num_positions} positions",
        f"donor {donor.image_size} px ({grid_d}x{grid_d} patches + CLS = {donor.num_positions} positions), target "
        f"{target.image_size} px ({target.num_positions} positions). Pass --interpolate-positions to resample the "
        "donor's position embeddings bicubically over the patch grid (the CLS position kept); robustness at the "
        "new resolution is not guaranteed, so verify it.",
        fixed_by=options.interpolate_positions and donor.hidden_size == target.hidden_size
        and donor.patch_size == target.patch_size,
        fixed=f"position embeddings interpolated bicubically from {grid_d}x{grid_d} to {grid_t}x{grid_t} patches "
              "(CLS position kept)")
    add("activation", donor.hidden_act, target.hidden_act,
        f"donor {donor.hidden_act}, target tower {target.hidden_act}. The donor's weights compute what they were "
        f"trained to only under {donor.hidden_act}. If the donor's config is right, pass --adopt-donor-activation "
        f"(the grafted tower then runs {donor.hidden_act}); if it came from an open_clip conversion with the wrong "
        "--activation, re-convert (OpenAI CLIP and its FARE/TeCoA fine-tunes: quick_gelu).",
        fixed_by=options.adopt_donor_activation,
        fixed=f"grafted tower runs the donor's activation {donor.hidden_act}")
    add("layer-norm eps", donor.layer_norm_eps, target.layer_norm_eps,
        f"donor {donor.layer_norm_eps:g}, target tower {target.layer_norm_eps:g}: every layer norm would be "
        "applied differently from training. Pass --adopt-donor-layer-norm-eps to run the grafted tower with the "
        "donor's eps, or fix the donor's config if it is wrong.",
        fixed_by=options.adopt_donor_layer_norm_eps,
        fixed=f"grafted tower uses the donor's layer-norm eps {donor.layer_norm_eps:g}")
    report.checks.append(_normalisation_check(donor, target, options))
    return report


def _normalisation_check(donor: TowerGeometry, target: TowerGeometry, options: GraftOptions) -> Check:
    target_values = {"mean": target.image_mean, "std": target.image_std}
    if donor.image_mean is None or donor.image_std is None:
        return Check("normalisation", None, target_values, "assumed",
                     "the donor came without a preprocessor config; assumed it was trained with the target's "
                     f"normalisation (mean {target.image_mean}, std {target.image_std}). If not, pass the donor's "
                     "--donor-image-mean/--donor-image-std.")
    donor_values = {"mean": donor.image_mean, "std": donor.image_std}
    same = all(
        math.isclose(a, b, abs_tol=NORMALISATION_TOLERANCE)
        for a, b in zip(donor.image_mean + donor.image_std, target.image_mean + target.image_std)
    )
    if same:
        return Check("normalisation", donor_values, target_values, "ok")
    if options.fold_normalisation:
        return Check("normalisation", donor_values, target_values, "fixed",
                     "the mean/std difference folded into the patch embedding and patch position embeddings "
                     "(exact; the target's processor is unchanged)")
    return Check("normalisation", donor_values, target_values, "mismatch",
                 f"donor mean {donor.image_mean} std {donor.image_std}, target processor mean {target.image_mean} "
                 f"std {target.image_std}: the donor would see inputs scaled differently from training. Pass "
                 "--fold-normalisation to fold the difference into the patch embedding (exact).")


# ------------------------------------------------------------------------------------------- fixes


def interpolate_position_embedding(weight: torch.Tensor, new_grid: int) -> torch.Tensor:
    """[1 + g*g, D] position embeddings -> [1 + new_grid^2, D]: bicubic over the patch grid, CLS row kept."""
    grid = math.isqrt(weight.shape[0] - 1)
    if grid * grid != weight.shape[0] - 1:
        raise ValueError(f"position embeddings with {weight.shape[0]} rows are not 1 CLS + a square grid")
    cls_position, patches = weight[:1], weight[1:]
    if new_grid == grid:
        return weight.clone()
    image = patches.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # [1, D, g, g], row-major patches
    resized = F.interpolate(image, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    resized = resized.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(weight.dtype)
    return torch.cat([cls_position, resized], dim=0)


def fold_normalisation(
    patch_weight: torch.Tensor,
    position_weight: torch.Tensor,
    donor_mean: Sequence[float],
    donor_std: Sequence[float],
    target_mean: Sequence[float],
    target_std: Sequence[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-embedding and position weights that give the donor's result on target-normalised input.

    The target's processor feeds x_t = (p - m_t) / s_t; the donor was trained on x_d = (p - m_d) / s_d =
    a·x_t + b with a = s_t / s_d and b = (m_t - m_d) / s_d per channel. The patch convolution has no bias,
    so the scale goes into its weights and the constant W·b (the same for every patch) into the patch rows
    of the position embedding; the CLS row is untouched.
    """
    as64 = lambda values: torch.tensor(values, dtype=torch.float64)
    scale = as64(target_std) / as64(donor_std)
    shift = (as64(target_mean) - as64(donor_mean)) / as64(donor_std)
    weight64 = patch_weight.double()
    new_patch = (weight64 * scale.view(1, -1, 1, 1)).to(patch_weight.dtype)
    constant = (weight64 * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))  # [D]
    new_positions = position_weight.double().clone()
    new_positions[1:] += constant
    return new_patch, new_positions.to(position_weight.dtype)


def adapt_donor_state(
    state: dict[str, torch.Tensor], donor: TowerGeometry, target: TowerGeometry, report: GeometryReport
) -> dict[str, torch.Tensor]:
    """Apply the fixes ``report`` marks as "fixed" to a canonical donor state dict (a new dict is returned)."""
    state = dict(state)
    fixed = set(report.fixed)
    if "image size / positions" in fixed:
        key = "embeddings.position_embedding.weight"
        state[key] = interpolate_position_embedding(state[key], math.isqrt(target.num_positions - 1))
    if "normalisation" in fixed:
        patch_key, position_key = "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight"
        state[patch_key], state[position_key] = fold_normalisation(
            state[patch_key], state[position_key], donor.image_mean, donor.image_std, target.image_mean, target.image_std
        )
    return state


def vision_config_updates(donor: TowerGeometry, report: GeometryReport) -> dict[str, Any]:
    """Changes to the grafted model's ``vision_config`` that the fixes imply."""
    fixed = set(report.fixed)
    updates: dict[str, Any] = {}
    if "activation" in fixed:
        updates["hidden_act"] = donor.hidden_act
    if "layer-norm eps" in fixed:
        updates["layer_norm_eps"] = donor.layer_norm_eps
    return updates
