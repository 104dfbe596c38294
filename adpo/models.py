"""Loading, the one way every stage gets a model: an LVLM, a CLIP model, or a vision encoder from any form adpo
reads (a hub id or ``save_pretrained`` directory, an adpo encoder directory or a trainer's run, an open_clip file, or a
plugin's name such as the bundled world's, see :mod:`adpo.plugins`), plus the identity key resume checks compare.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import CLIPVisionModel, PreTrainedModel

from adpo.encoder_io import check_weight_files, encoder_location, export_encoder, load_encoder, put_encoder
from adpo.errors import UsageError
from adpo.plugins import model_plugin
from adpo.preprocess import image_processor_of
from adpo.tower import feature_selection, find_vision_tower

# config model types read as a standalone encoder or a CLIP model; anything else with a vision tower is an LVLM
ENCODER_MODEL_TYPES = ("clip_vision_model",)
CLIP_MODEL_TYPES = ("clip",)


def load_lvlm(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, Any]:
    """Load a LLaVA-family model and its processor.

    ``name_or_path``: a hub id (e.g. ``llava-hf/llava-1.5-7b-hf``), a local ``save_pretrained`` directory, or a
    plugin's LVLM name (e.g. the bundled world's small and large LVLMs). ``quantization`` ("4bit" or "8bit")
    loads the frozen language model through bitsandbytes while the vision tower and projector stay in full
    precision (they are what adpo attacks and trains).
    """
    named = model_plugin(name_or_path)
    if named is not None:
        plugin, name = named
        if plugin.model_kind(name) != "lvlm":
            raise UsageError(f"{name_or_path!r} is a CLIP model, not an LVLM; name one of its LVLMs or a LLaVA model")
        model, processor = plugin.load_lvlm(name, resolve_dtype(dtype) or torch.float32)
        if device_map not in (None, "cpu"):
            model = model.to(device_map if isinstance(device_map, str) and device_map != "auto" else _default_device())
        return model, processor

    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if dtype is not None:
        kwargs["dtype"] = resolve_dtype(dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_config(quantization)
    check_weight_files(name_or_path)
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
    find_vision_tower(model)  # fail now, with a clear message, if this is not a vision-language model
    return model, processor


def load_clip(name_or_path: str, dtype: torch.dtype | str | None = None) -> tuple[Any, Any]:
    """A ``CLIPModel`` (image and text towers, projections) and its processor: a hub id, a local directory, or a
    plugin's CLIP name (e.g. the bundled world's WorldCLIP)."""
    named = model_plugin(name_or_path)
    if named is not None:
        plugin, name = named
        if plugin.model_kind(name) != "clip":
            raise UsageError(f"{name_or_path!r} is an LVLM, not a CLIP model; name a CLIPModel (dir, hub id or "
                             f"one of the {plugin.scheme!r} plugin's CLIP models)")
        return plugin.load_clip(name)
    from transformers import AutoProcessor, CLIPModel

    check_weight_files(name_or_path)
    kwargs = {} if dtype is None else {"dtype": resolve_dtype(dtype)}
    return CLIPModel.from_pretrained(name_or_path, **kwargs), AutoProcessor.from_pretrained(name_or_path)


def model_type_of(name_or_path: str, trust_remote_code: bool = False) -> str | None:
    """The ``model_type`` behind a name: ``clip`` / ``lvlm`` for a plugin's models, else the config's
    (``clip_vision_model``, ``clip``, ``llava``, ...); None when there is no config to read (a file, a missing hub id)."""
    named = model_plugin(name_or_path)
    if named is not None:
        return named[0].model_kind(named[1])
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        config = path / "config.json"
        return json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if path.exists():
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError):
        return None


@dataclass
class LoadedEncoder:
    """A vision encoder as a standalone ``CLIPVisionModel``, with what its source says about how it is used."""

    encoder: CLIPVisionModel
    image_processor: Any  # the source's resize/crop/normalisation; None when it ships none (an open_clip file)
    feature_layer: int | list[int] = -2  # what an LVLM's projector reads (LLaVA's defaults for CLIP sources)
    select_strategy: str = "default"
    kind: str = "clip_vision_model"  # the source: "clip_vision_model" (an encoder dir / id), "clip", "lvlm", "open_clip"
    clip_model: Any = None  # the CLIPModel it came from: its text tower serves zero-shot objectives
    clip_processor: Any = None
    record: dict = field(default_factory=dict)  # where it came from (cards and reports)


def load_vision_encoder(
    source: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    load_dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    activation: str | None = None,
    num_attention_heads: int | None = None,
) -> LoadedEncoder:
    """The vision encoder behind ``source``, from any form adpo reads: an encoder directory or hub id (a trainer's run
    or checkpoint stands for the ``encoder/`` it wrote), a ``CLIPModel`` (its vision part), an LVLM (its tower, with
    the LVLM's feature layer and strategy), an open_clip state-dict file (``activation`` required: the weights cannot
    tell it), or a plugin's model name. ``dtype``: the encoder's; ``load_dtype``: an LVLM's while its tower is copied
    out. Missing or unexpected encoder weights are refused (:func:`adpo.encoder_io.load_encoder`)."""
    text = encoder_location(source)
    record: dict[str, Any] = {"source": text}
    path = Path(text).expanduser()
    if model_plugin(text) is None and path.is_file():
        if activation is None:
            raise UsageError(f"{path} is an open_clip state dict: pass --activation (quick_gelu for OpenAI CLIP and its "
                             "FARE/TeCoA fine-tunes, gelu for LAION open_clip models); the weights cannot tell")
        from adpo.openclip import load_state_dict_file, openclip_to_clip_vision_model

        conversion = openclip_to_clip_vision_model(load_state_dict_file(path), hidden_act=activation,
                                                   num_attention_heads=num_attention_heads)
        record |= {"unused_keys": conversion.unused, "assumptions": conversion.assumptions, "activation": activation}
        return LoadedEncoder(conversion.model.to(resolve_dtype(dtype)), None, kind="open_clip", record=record)
    model_type = model_type_of(text, trust_remote_code)
    if model_type is None:
        raise UsageError(f"cannot read a model config from {text!r}: pass an encoder, CLIPModel or LVLM directory, a "
                         "hub id, an open_clip file, or a plugin's model name (e.g. the bundled world's)")
    if model_type in ENCODER_MODEL_TYPES:
        from transformers import AutoImageProcessor

        encoder = load_encoder(text, dtype=resolve_dtype(dtype))
        try:
            image_processor = AutoImageProcessor.from_pretrained(text)
        except OSError:  # no preprocessor config: the normalisation stays unknown (callers report it as assumed)
            image_processor = None
        card = path / "adpo_card.json"
        if card.is_file():
            record["card"] = json.loads(card.read_text())
        return LoadedEncoder(encoder, image_processor, record=record)
    if model_type in CLIP_MODEL_TYPES:
        clip, processor = load_clip(text, dtype=load_dtype or dtype)
        encoder = clip_vision_part(clip).to(resolve_dtype(dtype))
        return LoadedEncoder(encoder, image_processor_of(processor), kind="clip", clip_model=clip,
                             clip_processor=processor, record=record)
    lvlm, processor = load_lvlm(text, dtype=load_dtype, trust_remote_code=trust_remote_code)
    feature_layer, select_strategy = feature_selection(lvlm)
    encoder = export_encoder(lvlm).to(resolve_dtype(dtype))
    del lvlm  # the language model is not what an encoder is loaded for
    return LoadedEncoder(encoder, image_processor_of(processor), feature_layer, select_strategy, kind="lvlm", record=record)


def clip_vision_part(clip: Any) -> CLIPVisionModel:
    """A ``CLIPModel``'s image tower as a standalone ``CLIPVisionModel`` (a copy)."""
    encoder = CLIPVisionModel(clip.config.vision_config)
    put_encoder(encoder, {k: v for k, v in clip.state_dict().items() if k.startswith("vision_model.")})
    return encoder.to(clip.dtype)


def model_identity(name_or_path: str) -> str:
    """A short key that changes when the weights behind ``name_or_path`` change (for resume checks).

    A plugin's model: the plugin's key (the bundled world hashes the shipped files it is made from). A local
    directory: its ``config.json`` plus the name, size and modification time of every weight file (hashing multi-GB
    weights on every resume would cost minutes). A hub id: the id itself (a changed hub revision is not detected).
    """
    named = model_plugin(name_or_path)
    if named is not None:
        return named[0].model_identity(named[1])
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return f"hub-{name_or_path}"
    digest = hashlib.sha256()
    config = path / "config.json"
    digest.update(config.read_bytes() if config.is_file() else b"")
    for weight in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        stat = weight.stat()
        digest.update(f"{weight.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"dir-{digest.hexdigest()[:16]}"


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a dtype or a name ("float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16"); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def _quantization_config(quantization: str):
    from transformers import BitsAndBytesConfig

    skip = ["vision_tower", "multi_modal_projector", "lm_head"]
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ValueError(f"unknown quantization {quantization!r}; use '4bit', '8bit' or None")
