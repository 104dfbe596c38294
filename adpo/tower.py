"""The vision tower in pixel space: finding an LVLM's tower and projector, the tower as its language model sees it
(:class:`VisionTower`: [0, 1] pixels in, normalisation inside, the pooled embedding and the features the projector
consumes), and tower-only training (:func:`freeze_for_tower_training`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel

from adpo.preprocess import image_processor_of


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The CLIP vision tower of an LVLM (or the model itself if it is a vision encoder)."""
    if isinstance(model, CLIPVisionModel):
        return model
    for path in ("model.vision_tower", "vision_tower", "base_model.model.model.vision_tower"):
        module: Any = model
        for attribute in path.split("."):
            module = getattr(module, attribute, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):  # some LLaVA ports wrap the tower in a list
            module = module[0]
        if isinstance(module, nn.Module):
            return module
    raise ValueError(
        f"{type(model).__name__} has no vision tower (looked for model.vision_tower and vision_tower); "
        "adpo needs a LLaVA-family model such as LlavaForConditionalGeneration or a CLIPVisionModel"
    )


def find_projector(model: nn.Module) -> nn.Module:
    """The multimodal projector of a LLaVA-family model: what maps the tower's features into the LLM's embeddings."""
    projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    if not isinstance(projector, nn.Module):
        raise ValueError(f"{type(model).__name__} has no multi_modal_projector; adpo needs a LLaVA-style model here")
    return projector


def feature_selection(model: nn.Module) -> tuple[int | list[int], str]:
    """The LVLM's (vision_feature_layer, vision_feature_select_strategy), LLaVA's defaults when unset."""
    config = model.config
    return getattr(config, "vision_feature_layer", -2), getattr(config, "vision_feature_select_strategy", "default")


@dataclass
class TowerOutput:
    pooled: torch.Tensor | None  # [B, D] post-layernorm CLS embedding (what CLIP projects; FARE's default)
    llm_features: torch.Tensor | None  # [B, N, D'] features the projector consumes


class VisionTower(nn.Module):
    """A CLIP vision encoder viewed in pixel space, the way an LVLM's language model sees it.

    ``feature_layer`` and ``select_strategy`` follow LLaVA's ``vision_feature_layer`` (an index into the
    hidden states, or a list of them, concatenated) and ``vision_feature_select_strategy`` ("default" drops
    the CLS token, "full" keeps it).
    """

    def __init__(
        self,
        encoder: nn.Module,
        image_mean: Sequence[float],
        image_std: Sequence[float],
        image_size: int,
        feature_layer: int | list[int] = -2,
        select_strategy: str = "default",
    ):
        super().__init__()
        if select_strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {select_strategy!r}; use 'default' or 'full'")
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.image_size = int(image_size)
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy

    @classmethod
    def from_lvlm(cls, model: nn.Module, processor: Any) -> "VisionTower":
        feature_layer, select_strategy = feature_selection(model)
        return cls.from_encoder(find_vision_tower(model), processor, feature_layer=feature_layer, select_strategy=select_strategy)

    @classmethod
    def from_encoder(cls, encoder: nn.Module, processor: Any, feature_layer: int | list[int] = -2, select_strategy: str = "default") -> "VisionTower":
        image_processor = image_processor_of(processor)
        return cls(
            encoder,
            image_mean=image_processor.image_mean,
            image_std=image_processor.image_std,
            image_size=encoder.config.image_size,
            feature_layer=feature_layer,
            select_strategy=select_strategy,
        )

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels to the encoder's normalised input, in the encoder's dtype."""
        if pixels.dim() != 4 or pixels.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected pixels of shape [B, {self.mean.shape[1]}, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} pixels, got {pixels.shape[-2]}x{pixels.shape[-1]}; "
                "resize with adpo.preprocess.to_pixels(images, processor)"
            )
        mean, std = self.mean.to(pixels.device), self.std.to(pixels.device)
        return ((pixels.float() - mean) / std).to(self.dtype)

    def select(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        chosen = [hidden_states[i] for i in layers]
        if self.select_strategy == "default":
            chosen = [h[:, 1:] for h in chosen]
        return torch.cat(chosen, dim=-1)

    def forward(self, pixels: torch.Tensor, pooled: bool = True, llm_features: bool = True) -> TowerOutput:
        out = self.encoder(self.normalize(pixels), output_hidden_states=llm_features, return_dict=True)
        return TowerOutput(
            pooled=out.pooler_output if pooled else None,
            llm_features=self.select(out.hidden_states) if llm_features else None,
        )

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward(pixels, pooled=True, llm_features=False).pooled

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward(pixels, pooled=False, llm_features=True).llm_features

    def embed(self, pixels: torch.Tensor, which: str = "pooled") -> torch.Tensor:
        """The embedding named by ``which``: "pooled" or "llm" (the features the LLM consumes)."""
        if which == "pooled":
            return self.pooled(pixels)
        if which == "llm":
            return self.features(pixels)
        raise ValueError(f"unknown embedding {which!r}; use 'pooled' or 'llm'")

    def num_image_tokens(self) -> int:
        # LLaVA's rule: the backbone's tokens, minus the first one for the "default" strategy.
        grid = self.image_size // self.encoder.config.patch_size
        return grid * grid + prefix_token_count(self.encoder) - (1 if self.select_strategy == "default" else 0)


# --- non-CLIP backbones (issue 29): a tower need not be CLIP, only a backbone whose hidden states are token sequences
def prefix_token_count(encoder: nn.Module) -> int:
    """Tokens a vision backbone puts before its patch tokens: CLIP's class embedding or ViT's CLS token (1), DeiT's
    distillation token and DINOv2's registers on top; SigLIP has none (0)."""
    embeddings = getattr(getattr(encoder, "vision_model", encoder), "embeddings", None)
    count = int(hasattr(embeddings, "class_embedding") or hasattr(embeddings, "cls_token"))
    count += int(getattr(embeddings, "distillation_token", None) is not None)
    registers = getattr(embeddings, "register_tokens", None)
    return count + (int(registers.shape[1]) if registers is not None else 0)


@dataclass
class FreezeReport:
    trainable: list[str]
    frozen_unreachable: list[str]
    num_trainable: int
    num_frozen: int

    def summary(self) -> str:
        unreachable = ", ".join(self.frozen_unreachable) if self.frozen_unreachable else "none"
        return (f"training {self.num_trainable:,} vision-tower parameters; {self.num_frozen:,} frozen "
                f"(LLM, projector, and tower parameters no gradient can reach: {unreachable})")


def unreachable_tower_parameters(tower: VisionTower, uses: Iterable[str] = ("llm",)) -> list[str]:
    """Names of encoder parameters that no gradient can reach from the outputs in ``uses``
    ("llm": the LLM's features; "pooled": the pooled embedding), found by a probe backward pass."""
    uses = tuple(uses)
    unknown = set(uses) - {"llm", "pooled"}
    if unknown or not uses:
        raise ValueError(f"uses must name 'llm' and/or 'pooled', got {uses}")
    params = [(n, p) for n, p in tower.encoder.named_parameters()]
    flags = [p.requires_grad for _, p in params]
    try:
        for _, p in params:
            p.requires_grad_(True)
        probe = torch.zeros(1, 3, tower.image_size, tower.image_size, device=next(tower.encoder.parameters()).device)
        out = tower(probe, pooled="pooled" in uses, llm_features="llm" in uses)
        total = sum(t.float().sum() for t in (out.pooled, out.llm_features) if t is not None)
        grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
    finally:
        for (_, p), flag in zip(params, flags):
            p.requires_grad_(flag)
    return [name for (name, _), grad in zip(params, grads) if grad is None]


def freeze_for_tower_training(model: nn.Module, processor: Any = None, uses: Iterable[str] = ("llm",)) -> FreezeReport:
    """Freeze everything but the vision tower, and inside the tower every parameter that the outputs in
    ``uses`` can never reach (layers after the feature layer, the post-layernorm when only LLM features
    are used). Returns what is trained and what was frozen explicitly."""
    encoder = find_vision_tower(model)
    if processor is not None and encoder is not model:
        tower = VisionTower.from_lvlm(model, processor)
    else:
        feature_layer, select_strategy = feature_selection(model)
        tower = VisionTower(encoder, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], encoder.config.image_size,
                            feature_layer=feature_layer, select_strategy=select_strategy)
    unreachable = set(unreachable_tower_parameters(tower, uses))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    trainable = []
    for name, parameter in encoder.named_parameters():
        if name not in unreachable:
            parameter.requires_grad_(True)
            trainable.append(name)
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return FreezeReport(trainable, sorted(unreachable), num_trainable, num_frozen)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of flattened embeddings."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)
