"""The bundled world's two LLaVA-1.5-style models: WorldCLIP's vision tower + a 2-layer GELU projector + a real LM.

* ``small``: SmolLM2-135M-Instruct, ``large``: Gemma-3-270M (see :mod:`adpo.world.lm`).
* Both are plain :class:`~transformers.LlavaForConditionalGeneration` + :class:`~transformers.LlavaProcessor`
  with the llava-hf geometry conventions: vision feature layer -2, CLS dropped (strategy ``"default"``),
  ``"<image>"`` expanded by the processor into one placeholder per patch (16 for the 64-px, patch-16 tower).
* Both share one minimal chat template of ours (short prompts: every token costs CPU time)::

      <bos>User:<image>What color is the circle?
      Assistant: red<eos>

  The BOS token is written by the template (the tokenizers do not add one), so ``LlavaView.encode``
  (``add_special_tokens=False``) and ``processor(images=..., text=...)`` give the same ids.
  :func:`prompt_for` renders the prompt part; every stage must format world prompts with it (or with the
  processor's chat template, which is the same thing).

Only the trained projector (fp16) ships in ``adpo/world/weights/<size>/``; :func:`load_world_lvlm` assembles
the full model from it, the shipped WorldCLIP and the installed LM package, and caches the assembled model
(``save_pretrained``) keyed by the shipped weights' hashes so that later loads are a plain ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from adpo.io import atomic_directory, write_text_atomic
from adpo.world.lm import CONVERSION_VERSION, WORLD_LMS, cache_root, load_lm

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"
PROJECTOR_FILE = "projector.safetensors"
LM_LORA_FILE = "lm_lora.safetensors"  # optional LoRA adapter of the LM, merged into it at assembly

#: world LVLM size -> world LM name
SIZES: dict[str, str] = {"small": "smollm2", "large": "gemma3"}

IMAGE_TOKEN = "<image>"
VISION_FEATURE_LAYER = -2
VISION_FEATURE_SELECT_STRATEGY = "default"

# One template for both LMs. The assistant turn is " {answer}{eos}"; the generation prompt ends at "Assistant:".
CHAT_TEMPLATE = (
    "{{- bos_token if bos_token else '' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}User:{%- else -%}Assistant: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<image>{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] != 'user' -%}{{ eos_token }}{%- endif -%}{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)

#: bump when the assembly below changes, so stale assembled caches are rebuilt
ASSEMBLY_VERSION = 2


def prompt_for(question: str, processor) -> str:
    """The chat-formatted world prompt (BOS, ``<image>`` placeholder, question, "Assistant:") for ``processor``.

    Exactly what :meth:`adpo.lvlm.LlavaView.format_prompt` produces for the world's processors.
    """
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def answer_text(answer: str) -> str:
    """The assistant's reply as it follows :func:`prompt_for` (the eos token is appended as a token id)."""
    return " " + answer.strip()


def _check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"unknown world LVLM size {size!r}; choose one of {sorted(SIZES)}")
    return SIZES[size]


# ------------------------------------------------------------------------------------------ assembly


def build_processor(image_processor, tokenizer, patch_size: int):
    """A LlavaProcessor for the world: the tower's image processor + the LM tokenizer with ``<image>`` added."""
    from transformers import LlavaProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    # The chat template writes BOS itself; a tokenizer adding another (Gemma's does) would double it.
    if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        tokenizer.add_bos_token = False
        tokenizer.update_post_processor()  # the tokenizers backend adds BOS in its post-processor
    tokenizer.padding_side = "left"  # batched generation; RoPE makes the shift harmless for training too
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )


def build_world_lvlm(size: str, vision_model, image_processor, lm=None, tokenizer=None, seed: int = 0):
    """A fresh world LLaVA: ``vision_model`` (a ``CLIPVisionModel`` or ``CLIPModel``) + the size's LM.

    The projector is randomly initialised (seeded); training fills it. Returns ``(model, processor)`` in fp32.
    """
    from transformers import CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration

    lm_name = _check_size(size)
    if lm is None or tokenizer is None:
        lm, tokenizer = load_lm(lm_name, dtype=torch.float32)
    from adpo.encoder_io import put_encoder

    if not isinstance(vision_model, CLIPVisionModel):  # a full CLIPModel: keep its vision half
        vision_config = vision_model.config.vision_config
        vision_model = vision_model.vision_model
    else:
        vision_config = vision_model.config
    processor = build_processor(image_processor, tokenizer, vision_config.patch_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    old_vocab = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old_vocab:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():  # the placeholder row is never read; zero keeps its logit neutral
            lm.get_input_embeddings().weight[old_vocab:] = 0
    text_config = lm.config
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=VISION_FEATURE_SELECT_STRATEGY,
        vision_feature_layer=VISION_FEATURE_LAYER,
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    put_encoder(model, vision_model)  # the core knows the tower's key layout in every transformers version
    state = {f"model.language_model.{k}": v for k, v in lm.model.state_dict().items()}
    state["lm_head.weight"] = lm.lm_head.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_loaded = [k for k in missing if not k.startswith(("model.multi_modal_projector.", "model.vision_tower."))]
    if not_loaded or unexpected:
        raise RuntimeError(f"world LLaVA assembly mismatch: missing {not_loaded[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    model.eval()
    return model, processor


def projector_state(model) -> dict[str, torch.Tensor]:
    """The trainable part to ship: the projector's weights (fp16, keys relative to the projector)."""
    return {k: v.detach().to(torch.float16).contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}


def load_projector(model, path: Path) -> None:
    """Put a saved projector (``projector_state``'s fp16 file) into ``model``, as fp32; every key must match."""
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(path).items()}
    model.model.multi_modal_projector.load_state_dict(state, strict=True)


def merge_lm_lora(model, state: dict[str, torch.Tensor], scale: float) -> int:
    """Fold a LoRA adapter of the LM into its weights in place: ``W += scale · B @ A`` for each adapted layer.

    ``state`` has peft's saved key layout relative to the LM (``layers.0.self_attn.q_proj.lora_A.weight``).
    Merged, the model is a plain ``LlavaForConditionalGeneration`` again. Returns the number of layers merged.
    """
    modules = dict(model.model.language_model.named_modules())
    suffix = ".lora_A.weight"
    merged = 0
    for key in sorted(state):
        if not key.endswith(suffix):
            continue
        name = key[: -len(suffix)]
        if name not in modules or f"{name}.lora_B.weight" not in state:
            raise KeyError(f"LM LoRA adapter names {name!r}, which this LM lacks (or its lora_B is missing)")
        weight = modules[name].weight
        delta = state[f"{name}.lora_B.weight"].float() @ state[key].float()
        with torch.no_grad():
            weight.add_((scale * delta).to(weight.dtype))
        merged += 1
    return merged


def load_lm_lora(model, path: Path) -> int:
    """Merge a saved LM adapter (safetensors with ``lora_rank``/``lora_alpha`` metadata) into ``model``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    if "lora_rank" not in metadata or "lora_alpha" not in metadata:
        raise ValueError(f"{path} lacks lora_rank/lora_alpha metadata; rebuild it with `adpo world build`")
    return merge_lm_lora(model, state, float(metadata["lora_alpha"]) / int(metadata["lora_rank"]))


# ------------------------------------------------------------------------------------------ shipped weights


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict:
    path = Path(weights_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the world's trained weights are not in this checkout. "
            "Rebuild them with `adpo world build` (or restore adpo/world/weights/ from git)."
        )
    return json.loads(path.read_text())


def write_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict:
    """Hash every shipped file under ``weights_dir`` (clip/, small/, large/) into manifest.json (atomic)."""
    weights_dir = Path(weights_dir)
    files = {
        str(p.relative_to(weights_dir)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(weights_dir.rglob("*"))
        if p.is_file() and p.name != "manifest.json" and not p.name.startswith(".")
    }
    manifest = {"format": 1, "total_bytes": sum(f["bytes"] for f in files.values()), "files": files}
    write_text_atomic(weights_dir / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict[str, str]:
    """``{relative path: "ok" | "missing" | "hash mismatch"}`` for every file the manifest lists."""
    weights_dir = Path(weights_dir)
    status = {}
    for rel, entry in read_manifest(weights_dir)["files"].items():
        path = weights_dir / rel
        if not path.is_file():
            status[rel] = "missing"
        else:
            status[rel] = "ok" if sha256_file(path) == entry["sha256"] else "hash mismatch"
    return status


def _assembly_key(size: str, manifest: dict) -> str:
    relevant = {k: v["sha256"] for k, v in manifest["files"].items() if k.startswith(("clip/", f"{size}/"))}
    payload = json.dumps(
        {"files": relevant, "lm": SIZES[size], "conversion": CONVERSION_VERSION, "assembly": ASSEMBLY_VERSION},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def assembly_key(size: str, weights_dir: Path = WEIGHTS_DIR) -> str:
    """Key of the ``size`` LVLM as the shipped weights assemble it (changes when WorldCLIP or its projector does)."""
    _check_size(size)
    return _assembly_key(size, read_manifest(weights_dir))


def world_model_key(name: str, weights_dir: Path = WEIGHTS_DIR) -> str:
    """Key of ``world:<name>`` (``clip``, ``small`` or ``large``) that changes when its shipped weights do."""
    if name != "clip":
        return assembly_key(name, weights_dir)
    files = {k: v["sha256"] for k, v in read_manifest(weights_dir)["files"].items() if k.startswith("clip/")}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def assembled_cache_dir(size: str, weights_dir: Path = WEIGHTS_DIR) -> Path:
    return cache_root() / "lvlm" / f"{size}-{assembly_key(size, weights_dir)}"


def stale_world_caches(weights_dir: Path = WEIGHTS_DIR) -> list[Path]:
    """Cache folders the current checkout no longer loads.

    That covers assembled LVLMs keyed by earlier shipped weights, LM conversions of an earlier conversion
    version, and staging folders an interrupted assembly left behind. Each assembled LVLM is ~0.4-0.6 GB
    and a new key appears whenever the shipped weights change, so they pile up
    (``adpo world prune`` removes them).
    """
    from adpo.world.lm import lm_cache_dir

    current = {lm_cache_dir(name) for name in WORLD_LMS}
    kinds = ["lm"]
    if (Path(weights_dir) / "manifest.json").is_file():  # without it no assembled LVLM can be told current
        current.update(assembled_cache_dir(size, weights_dir) for size in SIZES)
        kinds.insert(0, "lvlm")
    stale = []
    for kind in kinds:
        folder = cache_root() / kind
        if folder.is_dir():
            stale.extend(entry for entry in sorted(folder.iterdir()) if entry.is_dir() and entry not in current)
    return stale


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def assemble_world_lvlm(size: str, weights_dir: Path = WEIGHTS_DIR):
    """Full world LLaVA from shipped weights + the installed LM package (slow path; see :func:`load_world_lvlm`)."""
    weights_dir = Path(weights_dir)
    projector_path = weights_dir / size / PROJECTOR_FILE
    if not projector_path.is_file():
        raise FileNotFoundError(
            f"{projector_path} is missing: the {size} world LVLM has not been trained in this checkout. "
            f"Run `adpo world build --stages {size}`."
        )
    from adpo.world.clip import load_world_clip

    record_path = weights_dir / size / "training.json"
    trained_on = json.loads(record_path.read_text()).get("clip_sha256") if record_path.is_file() else None
    if trained_on and trained_on != sha256_file(weights_dir / "clip" / "model.safetensors"):
        raise RuntimeError(
            f"{projector_path} was trained on a different WorldCLIP than the one in {weights_dir / 'clip'}; "
            f"retrain it on this tower with `adpo world build --stages {size}`."
        )
    clip_model, clip_processor = load_world_clip(weights_dir / "clip")
    model, processor = build_world_lvlm(size, clip_model, clip_processor.image_processor)
    load_projector(model, projector_path)
    if (weights_dir / size / LM_LORA_FILE).is_file():
        load_lm_lora(model, weights_dir / size / LM_LORA_FILE)
    return model, processor


def load_world_lvlm(size: str = "small", dtype: torch.dtype = torch.float32, weights_dir: Path | str = WEIGHTS_DIR):
    """``(LlavaForConditionalGeneration, LlavaProcessor)`` of the bundled world's ``size`` ("small" | "large").

    The first call assembles the model (LM conversion from GGUF included) and caches it under
    ``$ADPO_CACHE/world/lvlm`` (or ``~/.cache/adpo/world/lvlm``) keyed by the shipped weights' hashes; later calls
    load that folder. A missing LM package raises :class:`adpo.world.lm.MissingLMPackageError` with the
    install command.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    _check_size(size)
    weights_dir = Path(weights_dir)
    target = assembled_cache_dir(size, weights_dir)
    if not (target / "config.json").is_file():
        model, processor = assemble_world_lvlm(size, weights_dir)
        with atomic_directory(target) as staging:
            # The LM's weights are bf16 values (see adpo.world.lm): storing them as bf16 is exact and halves
            # the bytes a warm load reads; the tower and projector stay fp32.
            language_model = model.model.language_model
            language_model.to(torch.bfloat16)
            model.lm_head.to(torch.bfloat16)
            model.save_pretrained(staging)
            language_model.to(torch.float32)
            model.lm_head.to(torch.float32)
            processor.save_pretrained(staging)
        if dtype == torch.float32:
            return model, processor
    model = LlavaForConditionalGeneration.from_pretrained(target, dtype=dtype)
    processor = LlavaProcessor.from_pretrained(target)
    model.eval()
    return model, processor


def lm_name_for(size: str) -> str:
    return WORLD_LMS[_check_size(size)].description
