"""open_clip ViT state dicts <-> Hugging Face ``CLIPVisionModel``.

Published robust CLIP encoders (FARE, TeCoA) ship as open_clip state dicts of the visual tower; LLaVA
takes a HF ``CLIPVisionModel``. The conversion is a pure renaming plus two reshapes (the fused
attention input projection is split into q/k/v; ``proj`` is transposed into ``visual_projection``),
so it must be exact: every key is accounted for, every shape is asserted, and anything this layout
cannot express (layer scale, attention pooling, a missing ``ln_pre``) is refused instead of guessed.

What the weights cannot tell us is asked for explicitly: the activation (OpenAI's CLIP weights use
``quick_gelu``, LAION's use ``gelu``) and, when the head width is not the usual 64, the head count.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

from adpo.io import atomic_file

# OpenAI CLIP ViTs use 64-dimensional attention heads; open_clip keeps that convention for its ViTs.
CONVENTIONAL_HEAD_WIDTH = 64
SUPPORTED_ACTIVATIONS = ("quick_gelu", "gelu")
TORCH_LOAD_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Containers that training scripts wrap a state dict in.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


class UnsafeCheckpointError(ValueError):
    """The file is not safetensors and not loadable with ``torch.load(weights_only=True)``."""


@dataclass
class OpenClipConversion:
    """Result of converting an open_clip visual state dict."""

    model: CLIPVisionModel | CLIPVisionModelWithProjection
    config: CLIPVisionConfig
    # open_clip key -> HF key(s) it became (relative to the CLIPVisionModel, "visual_projection.weight" for proj)
    key_map: dict[str, list[str]]
    # open_clip keys deliberately not carried over, with the reason
    unused: dict[str, str] = field(default_factory=dict)
    # decisions taken on the user's behalf that the weights could not confirm (e.g. inferred head count)
    assumptions: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- files


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load tensors from ``.safetensors`` or a torch file readable with ``weights_only=True``.

    Pickles that need arbitrary code to load are refused. A state dict wrapped in ``{"state_dict": ...}``
    (or ``model`` / ``module``) is unwrapped; a ``module.`` prefix (DDP) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        state: object = load_file(str(path), device="cpu")
    elif path.suffix in TORCH_LOAD_SUFFIXES:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(
                f"{path}: refused: this torch file holds Python objects that torch.load(weights_only=True) will "
                "not rebuild, and loading it fully would run arbitrary code. In an environment you trust, load it "
                "and save only its tensors, e.g. safetensors.torch.save_file(state_dict, 'encoder.safetensors'), "
                f"then pass that file. (torch said: {str(error).splitlines()[0]})"
            ) from None
    else:
        raise UnsafeCheckpointError(
            f"{path}: refused: unsupported checkpoint format {path.suffix!r}. Only .safetensors and torch files "
            f"({', '.join(TORCH_LOAD_SUFFIXES)}) loadable with torch.load(weights_only=True) are accepted; "
            "pickles and other formats can run arbitrary code. Convert the file to safetensors where you trust it."
        )
    return _unwrap_state_dict(state, path)


def _unwrap_state_dict(state: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict):
        wrapped = [key for key in WRAPPER_KEYS if key in state and isinstance(state[key], dict)]
        if not wrapped:
            break
        state = state[wrapped[0]]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    not_tensors = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise ValueError(
            f"{path}: entries that are not tensors: {not_tensors[:8]}; save only the encoder's state_dict()"
        )
    return {key.removeprefix("module."): value for key, value in state.items()}


def save_state_dict_file(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``state`` as safetensors atomically (temp file + rename)."""
    with atomic_file(path) as temporary:
        save_file({key: value.detach().contiguous() for key, value in state.items()}, str(temporary))
    return Path(path)


# ---------------------------------------------------------------------------------- key mapping


def visual_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep the visual tower of a full open_clip CLIP state dict (``visual.*``); report the rest as unused."""
    if not any(key.startswith("visual.") for key in state):
        return dict(state), {}
    visual = {key.removeprefix("visual."): value for key, value in state.items() if key.startswith("visual.")}
    unused = {key: "not part of the vision tower (text tower / logit scale)" for key in state if not key.startswith("visual.")}
    return visual, unused


def _layer_indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    found = {int(match.group(1)) for key in state if (match := regex.match(key))}
    indices = sorted(found)
    if indices != list(range(len(indices))):
        raise ValueError(f"layer indices are not contiguous from 0: {indices}")
    return indices


def infer_vision_config(
    state: dict[str, torch.Tensor],
    *,
    hidden_act: str,
    num_attention_heads: int | None = None,
    layer_norm_eps: float = 1e-5,
) -> tuple[CLIPVisionConfig, list[str]]:
    """Read a ``CLIPVisionConfig`` off an open_clip visual state dict; returns it and the assumptions made."""
    if hidden_act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(
            f"hidden_act={hidden_act!r}: pass the activation the encoder was trained with, one of "
            f"{SUPPORTED_ACTIVATIONS} (OpenAI CLIP weights and FARE/TeCoA fine-tunes of them: quick_gelu; "
            "LAION open_clip models: gelu)"
        )
    for required in ("conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight"):
        if required not in state:
            raise ValueError(
                f"missing {required!r}: this is not an open_clip ViT visual state dict "
                f"(first keys: {sorted(state)[:6]})"
            )
    conv = state["conv1.weight"]
    hidden_size, in_channels, patch_size, patch_width = conv.shape
    if in_channels != 3 or patch_size != patch_width:
        raise ValueError(f"conv1.weight has shape {tuple(conv.shape)}; expected [hidden, 3, patch, patch]")
    positions = state["positional_embedding"].shape[0]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(
            f"positional_embedding has {positions} rows; expected 1 class position + a square patch grid"
        )
    assumptions = []
    if num_attention_heads is None:
        if hidden_size % CONVENTIONAL_HEAD_WIDTH:
            raise ValueError(
                f"cannot infer the head count: hidden size {hidden_size} is not a multiple of "
                f"{CONVENTIONAL_HEAD_WIDTH}; pass num_attention_heads"
            )
        num_attention_heads = hidden_size // CONVENTIONAL_HEAD_WIDTH
        assumptions.append(
            f"num_attention_heads={num_attention_heads} inferred as hidden {hidden_size} / head width "
            f"{CONVENTIONAL_HEAD_WIDTH} (the weights cannot tell); pass num_attention_heads if the model used another"
        )
    if hidden_size % num_attention_heads:
        raise ValueError(f"hidden size {hidden_size} is not divisible by num_attention_heads={num_attention_heads}")
    num_layers = len(_layer_indices(state, r"transformer\.resblocks\.(\d+)\."))
    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_channels=3,
        image_size=grid * patch_size,
        patch_size=patch_size,
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
        projection_dim=state["proj"].shape[1] if "proj" in state else hidden_size,
    )
    return config, assumptions


def _shape_checker(config: CLIPVisionConfig):
    hidden, inner, patch = config.hidden_size, config.intermediate_size, config.patch_size
    positions = (config.image_size // patch) ** 2 + 1

    def expected(open_clip_key: str) -> tuple[int, ...]:
        suffix = re.sub(r"^transformer\.resblocks\.\d+\.", "", open_clip_key)
        return {
            "conv1.weight": (hidden, 3, patch, patch),
            "class_embedding": (hidden,),
            "positional_embedding": (positions, hidden),
            "attn.in_proj_weight": (3 * hidden, hidden),
            "attn.in_proj_bias": (3 * hidden,),
            "attn.out_proj.weight": (hidden, hidden),
            "mlp.c_fc.weight": (inner, hidden),
            "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (hidden, inner),
            "proj": (hidden, config.projection_dim),
        }.get(suffix, (hidden,))  # every remaining tensor is a layer-norm weight/bias or out_proj bias

    def check(key: str, tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != expected(key):
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {expected(key)} for {_describe(config)}")
        return tensor

    return check


def _describe(config: CLIPVisionConfig) -> str:
    return (
        f"ViT(hidden={config.hidden_size}, mlp={config.intermediate_size}, layers={config.num_hidden_layers}, "
        f"patch={config.patch_size}, image={config.image_size})"
    )


def _layer_pairs(index: int) -> list[tuple[str, str]]:
    """(open_clip suffix, HF suffix) of one residual block's one-to-one tensors."""
    source, target = f"transformer.resblocks.{index}.", f"encoder.layers.{index}."
    pairs = [
        ("ln_1", "layer_norm1"),
        ("attn.out_proj", "self_attn.out_proj"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
    ]
    return [(f"{source}{a}.{p}", f"{target}{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _one_to_one_pairs(config: CLIPVisionConfig) -> list[tuple[str, str]]:
    pairs = [
        ("conv1.weight", "embeddings.patch_embedding.weight"),
        ("class_embedding", "embeddings.class_embedding"),
        ("positional_embedding", "embeddings.position_embedding.weight"),
        ("ln_pre.weight", "pre_layrnorm.weight"),
        ("ln_pre.bias", "pre_layrnorm.bias"),
        ("ln_post.weight", "post_layernorm.weight"),
        ("ln_post.bias", "post_layernorm.bias"),
    ]
    for index in range(config.num_hidden_layers):
        pairs += _layer_pairs(index)
    return pairs


def _split_names(index: int, kind: str) -> list[str]:
    return [f"encoder.layers.{index}.self_attn.{name}_proj.{kind}" for name in ("q", "k", "v")]


def openclip_to_hf_state(
    state: dict[str, torch.Tensor], config: CLIPVisionConfig
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, list[str]]]:
    """Rename an open_clip visual state dict into ``CLIPVisionModel`` keys.

    Returns (HF state dict, ``visual_projection.weight`` (= ``proj``.T) or None, key map). Raises naming
    every missing or unrecognised key and every wrong shape.
    """
    check = _shape_checker(config)
    hf_state: dict[str, torch.Tensor] = {}
    key_map: dict[str, list[str]] = {}
    missing = []

    def take(key: str) -> torch.Tensor | None:
        if key not in state:
            missing.append(key)
            return None
        return check(key, state[key])

    for source, target in _one_to_one_pairs(config):
        if (tensor := take(source)) is not None:
            hf_state[target] = tensor.clone()
            key_map[source] = [target]
    for index in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            source = f"transformer.resblocks.{index}.attn.in_proj_{kind}"
            if (fused := take(source)) is not None:
                names = _split_names(index, kind)
                # nn.MultiheadAttention stacks [q; k; v] along the output dimension.
                for name, part in zip(names, fused.chunk(3, dim=0)):
                    hf_state[name] = part.clone()
                key_map[source] = names
    projection = None
    if "proj" in state:
        projection = check("proj", state["proj"]).t().contiguous().clone()
        key_map["proj"] = ["visual_projection.weight"]
    unrecognised = sorted(set(state) - set(key_map) - set(missing))
    problems = []
    if "ln_pre.weight" in missing:
        problems.append(
            "no ln_pre: this ViT skips the pre-transformer layer norm, which HF CLIPVisionModel always applies; "
            "it cannot be converted exactly"
        )
    if missing:
        problems.append(f"missing keys: {missing}")
    if unrecognised:
        problems.append(
            f"unrecognised keys (layer scale, attention pooling or another ViT variant HF CLIPVisionModel cannot "
            f"express): {unrecognised[:12]}{' ...' if len(unrecognised) > 12 else ''}"
        )
    if problems:
        raise ValueError(f"open_clip -> HF conversion of {_describe(config)} refused: " + "; ".join(problems))
    return hf_state, projection, key_map


def hf_state_to_openclip(
    hf_state: dict[str, torch.Tensor], config: CLIPVisionConfig, projection: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`openclip_to_hf_state` (``hf_state`` in ``CLIPVisionModel`` key layout)."""
    expected_keys = {target for _, target in _one_to_one_pairs(config)}
    for index in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            expected_keys.update(_split_names(index, kind))
    missing, extra = sorted(expected_keys - set(hf_state)), sorted(set(hf_state) - expected_keys)
    if missing or extra:
        raise ValueError(
            f"HF -> open_clip conversion of {_describe(config)} refused: missing {missing[:8]}, unexpected {extra[:8]} "
            "(pass a CLIPVisionModel state dict without prefixes)"
        )
    check = _shape_checker(config)
    state = {source: check(source, hf_state[target].clone()) for source, target in _one_to_one_pairs(config)}
    for index in range(config.num_hidden_layers):
        for kind in ("weight", "bias"):
            key = f"transformer.resblocks.{index}.attn.in_proj_{kind}"
            state[key] = check(key, torch.cat([hf_state[name] for name in _split_names(index, kind)], dim=0))
    if projection is not None:
        state["proj"] = check("proj", projection.t().contiguous().clone())
    return state


# ------------------------------------------------------------------------------------- models


def openclip_to_clip_vision_model(
    state: dict[str, torch.Tensor],
    *,
    hidden_act: str,
    num_attention_heads: int | None = None,
    layer_norm_eps: float = 1e-5,
    with_projection: bool = False,
) -> OpenClipConversion:
    """Build a HF ``CLIPVisionModel`` (or ``...WithProjection``) holding an open_clip visual tower's weights.

    ``state`` may be the visual tower alone or a full open_clip CLIP state dict (``visual.*`` is kept and
    the text tower reported as unused). Without ``with_projection`` the ``proj`` matrix is reported as
    unused: LLaVA reads hidden states, not the projected embedding.
    """
    visual, unused = visual_state(state)
    config, assumptions = infer_vision_config(
        visual, hidden_act=hidden_act, num_attention_heads=num_attention_heads, layer_norm_eps=layer_norm_eps
    )
    hf_state, projection, key_map = openclip_to_hf_state(visual, config)
    if with_projection:
        if projection is None:
            raise ValueError("with_projection=True but the state dict has no 'proj'")
        model = CLIPVisionModelWithProjection(config)
        _load_exact(model.vision_model, hf_state)
        _load_exact(model.visual_projection, {"weight": projection})
    else:
        model = CLIPVisionModel(config)
        _load_exact(model, hf_state)
        if projection is not None:
            del key_map["proj"]
            unused["proj"] = (
                "CLIPVisionModel has no projection head (LLaVA reads hidden states); convert with "
                "with_projection=True to keep it as visual_projection"
            )
    return OpenClipConversion(model.eval(), config, key_map, unused, assumptions)


def clip_vision_model_to_openclip(model: CLIPVisionModel | CLIPVisionModelWithProjection) -> dict[str, torch.Tensor]:
    """open_clip visual state dict of a HF CLIP vision model (``proj`` included when it has a projection)."""
    if isinstance(model, CLIPVisionModelWithProjection):
        return hf_state_to_openclip(model.vision_model.state_dict(), model.config, model.visual_projection.weight)
    return hf_state_to_openclip(model.state_dict(), model.config)


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = module.load_state_dict(state, strict=False)
    # Non-persistent buffers (position_ids) are never in a state dict; anything else missing is a bug.
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"state dict does not fit {type(module).__name__}: missing {missing}, unexpected {result.unexpected_keys}")
