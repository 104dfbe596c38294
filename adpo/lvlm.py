"""The LVLM adapter: load LLaVA-family models and reach their CLIP vision tower in pixel space.

* :func:`load_lvlm` loads a model and its processor from a hub id, a local directory or a bundled-world
  name (``world:small``, ``world:large``).
* :class:`VisionTower` is the tower as the LLM sees it: pixels in [0, 1] in, normalisation inside,
  out the pooled embedding and the features the projector consumes (feature layer, CLS strategy).
* :class:`LlavaView` is the whole LVLM on pixel-space images: prompt encoding with answer labels,
  per-answer log-probabilities (LM head applied only where needed), generation.
* Tower-only training (:func:`freeze_for_tower_training`) and encoder import/export as a standalone
  ``CLIPVisionModel`` whatever the checkpoint's key layout.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, PreTrainedModel

from adpo.io import atomic_directory
from adpo.preprocess import image_processor_of
from adpo.runtime import ENCODER_DIRNAME

WORLD_PREFIX = "world:"

# Key prefixes under which a CLIP vision tower's weights appear in LLaVA checkpoints and in older
# transformers layouts; stripping them gives the layout of a standalone CLIPVisionModel.
_ENCODER_PREFIXES = ("model.vision_tower.", "vision_tower.", "vision_model.")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------
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

    ``name_or_path``: a hub id (e.g. ``llava-hf/llava-1.5-7b-hf``), a local ``save_pretrained`` directory,
    or ``world:small`` / ``world:large`` for the bundled world. ``quantization`` ("4bit" or "8bit") loads
    the frozen language model through bitsandbytes while the vision tower and projector stay in full
    precision (they are what adpo attacks and trains).
    """
    if name_or_path.startswith(WORLD_PREFIX):
        from adpo import world  # imported lazily: the world needs its optional extras

        size = name_or_path[len(WORLD_PREFIX):]
        model, processor = world.load_world_lvlm(size, dtype=resolve_dtype(dtype) or torch.float32)
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


def model_identity(name_or_path: str) -> str:
    """A short key that changes when the weights behind ``name_or_path`` change (for resume checks).

    ``world:*`` (``clip``, ``small``, ``large``): the hashes of the shipped files it is made from. A local
    directory: its ``config.json`` plus the name, size and modification time of every weight file (hashing
    multi-GB weights on every resume would cost minutes). A hub id: the id itself (a changed hub revision is
    not detected).
    """
    if name_or_path.startswith(WORLD_PREFIX):
        from adpo.world.lvlm import world_model_key

        return f"world-{world_model_key(name_or_path[len(WORLD_PREFIX):])}"
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


# ----------------------------------------------------------------------------------------------------
# The vision tower in pixel space
# ----------------------------------------------------------------------------------------------------
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
        grid = self.image_size // self.encoder.config.patch_size
        per_layer = grid * grid + (0 if self.select_strategy == "default" else 1)
        return per_layer


# ----------------------------------------------------------------------------------------------------
# The whole LVLM in pixel space
# ----------------------------------------------------------------------------------------------------
@dataclass
class AnswerScores:
    """Teacher-forced scores of the answer tokens (``labels != -100``) per sample."""

    sum_logps: torch.Tensor  # [B] Σ_t log p(y_t | y_<t, x, q)
    num_tokens: torch.Tensor  # [B]
    all_greedy: torch.Tensor  # [B] bool: every answer token is the arg-max prediction
    token_logps: torch.Tensor  # [N] per answer token, concatenated over the batch
    sample_index: torch.Tensor  # [N] which sample each answer token belongs to


@dataclass
class EncodedPrompts:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None
    prompts: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "EncodedPrompts":
        return EncodedPrompts(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            None if self.labels is None else self.labels.to(device),
            self.prompts,
        )


# LLaVA-1.5's conversation format, used when a processor ships no chat template.
_LLAVA15_PROMPT = "USER: <image>\n{question} ASSISTANT:"


class LlavaView:
    """A LLaVA-family model driven by pixel-space images (normalisation inside).

    One view serves attacks (``answer_scores`` is differentiable in the pixels), pair generation
    (``generate``) and evaluation. Prompts are formatted with the processor's chat template.
    """

    def __init__(self, model: PreTrainedModel, processor: Any):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tower = VisionTower.from_lvlm(model, processor)
        config = model.config
        self.image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
        if self.image_token_id is None:
            raise ValueError("model.config has no image_token_id; is this a LLaVA-family model?")
        self.image_token = self.tokenizer.convert_ids_to_tokens(int(self.image_token_id))
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if generation_eos is None:
            generation_eos = self.tokenizer.eos_token_id
        self.eos_token_ids = set([generation_eos] if isinstance(generation_eos, int) else list(generation_eos or []))
        if not self.eos_token_ids:
            raise ValueError("neither the generation config nor the tokenizer names an end-of-sequence token; set "
                             "model.generation_config.eos_token_id so answers can end where generation stops")
        # Their texts, the tokenizer's own EOS first: the token a chat template's missing end of turn is written as.
        eos_ids = sorted(self.eos_token_ids, key=lambda i: (i != self.tokenizer.eos_token_id, i))
        self.end_of_turn_tokens = [self.tokenizer.convert_ids_to_tokens(int(i)) for i in eos_ids]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- prompts -------------------------------------------------------------------------------------
    def format_prompt(self, question: str) -> str:
        """The chat-formatted prompt text for one image + question, ending where the answer starts."""
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else None
        if template_owner is None:
            return _LLAVA15_PROMPT.format(question=question)
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return template_owner.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def _expand_image_tokens(self, text: str) -> str:
        count = text.count(self.image_token)
        if count != 1:
            raise ValueError(f"a prompt must hold exactly one image placeholder {self.image_token!r}, found {count}: {text!r}")
        return text.replace(self.image_token, self.image_token * self.tower.num_image_tokens())

    def encode(self, questions: Sequence[str], answers: Sequence[str] | None = None) -> EncodedPrompts:
        """Token ids (left-padded) for ``questions``; with ``answers``, labels mark the answer tokens.

        The prompt's ids are exactly what ``processor(images=..., text=prompt)`` gives (BOS included where the
        tokenizer adds it). The answer is the assistant turn as the model was trained on it: the answer's tokens
        and the end-of-turn token, nothing else (:meth:`completion_text`). That is where greedy generation stops,
        so "every answer token is the greedy prediction" means "generation reproduces the answer".
        """
        if answers is not None and len(answers) != len(questions):
            raise ValueError(f"got {len(questions)} questions but {len(answers)} answers")
        prompts = [self.format_prompt(q) for q in questions]
        rows, label_rows = [], []
        for i, prompt in enumerate(prompts):
            expanded = self._expand_image_tokens(prompt)
            prompt_ids = self._tokenize(expanded)
            if answers is None:
                rows.append(prompt_ids)
                continue
            answer_ids = self._answer_ids(expanded, prompt_ids, self.completion_text(questions[i], answers[i]))
            rows.append(prompt_ids + answer_ids)
            label_rows.append([-100] * len(prompt_ids) + answer_ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long) if answers is not None else None
        for i, row in enumerate(rows):
            input_ids[i, width - len(row):] = torch.tensor(row)
            attention_mask[i, width - len(row):] = 1
            if labels is not None:
                labels[i, width - len(row):] = torch.tensor(label_rows[i])
        return EncodedPrompts(input_ids, attention_mask, labels, prompts)

    def _tokenize(self, text: str) -> list[int]:
        """Ids of a rendered conversation as the processor makes them: with the tokenizer's special tokens (Llama's
        ``<s>``) unless the template wrote the BOS itself (the rule of ``apply_chat_template(tokenize=True)``)."""
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def completion_text(self, question: str, answer: str) -> str:
        """The assistant turn after the generation prompt, as text ending with its end-of-turn token.

        Rendered by the chat template and cut after the first end-of-turn token (ChatML's trailing newline and
        the like are not part of the answer). Templates that render the turn without one (llava-hf's LLaVA-1.5:
        "ASSISTANT: {answer} ") get the model's end-of-sequence token in place of the trailing whitespace, since
        the model was trained on "ASSISTANT: {answer}</s>".
        """
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else None
        if template_owner is None:
            completion = " " + answer
        else:
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
            assistant = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
            full = template_owner.apply_chat_template([user, assistant], tokenize=False)
            prefix = template_owner.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
            if not full.startswith(prefix):
                raise ValueError("the chat template renders the assistant turn in a way adpo cannot split from the "
                                 f"generation prompt ({prefix[-40:]!r} is not a prefix of {full[-60:]!r})")
            completion = full[len(prefix):]
        ends = [(completion.find(token), token) for token in self.end_of_turn_tokens if token in completion]
        if ends:
            position, token = min(ends)
            return completion[: position + len(token)]
        return completion.rstrip() + self.end_of_turn_tokens[0]

    def _answer_ids(self, prompt: str, prompt_ids: list[int], completion: str) -> list[int]:
        """The completion's ids as they follow the prompt in one tokenisation of the whole conversation (the way
        the model was trained); where the answer's first token would merge with the prompt's last, the
        completion tokenised on its own (the way generation, which starts after the prompt's ids, produces it)."""
        full = self._tokenize(prompt + completion)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return full[len(prompt_ids):]
        return self.tokenizer(completion, add_special_tokens=False)["input_ids"]

    # --- forward passes ------------------------------------------------------------------------------
    def answer_scores(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> AnswerScores:
        """Teacher-forced log-probabilities of the answer tokens; differentiable in ``pixels``.

        The LM head runs only at positions that predict an answer token, which matters for LMs with
        large vocabularies (Gemma's is 262k).
        """
        device = self.device
        input_ids, attention_mask, labels = input_ids.to(device), attention_mask.to(device), labels.to(device)
        outputs = self.model.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=self.tower.normalize(pixels.to(device)),
            return_dict=True,
        )
        hidden = outputs.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        sample_index = mask.nonzero(as_tuple=True)[0]
        logits = self.model.get_output_embeddings()(hidden[mask]).float()
        softcap = getattr(getattr(self.model.config, "text_config", None), "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        target_tokens = targets[mask]
        token_logps = torch.log_softmax(logits, dim=-1).gather(1, target_tokens[:, None]).squeeze(1)
        is_greedy = logits.argmax(dim=-1) == target_tokens
        batch = input_ids.shape[0]
        sum_logps = torch.zeros(batch, device=device, dtype=token_logps.dtype).index_add(0, sample_index, token_logps)
        num_tokens = torch.zeros(batch, device=device, dtype=token_logps.dtype).index_add(0, sample_index, torch.ones_like(token_logps))
        misses = torch.zeros(batch, device=device, dtype=torch.long).index_add(0, sample_index, (~is_greedy).long())
        return AnswerScores(sum_logps, num_tokens, misses == 0, token_logps, sample_index)

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, questions: Sequence[str], max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Answers to ``questions`` about ``pixels`` (greedy by default), decoded and stripped."""
        encoded = self.encode(questions).to(self.device)
        generate_kwargs.setdefault("do_sample", False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self.eos_token_ids), 0)
        output = self.model.generate(
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            pixel_values=self.tower.normalize(pixels.to(self.device)),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **generate_kwargs,
        )
        new_tokens = output[:, encoded.input_ids.shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------------
# Tower-only training
# ----------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------
# Encoder import / export (the interchange format: a CLIPVisionModel directory)
# ----------------------------------------------------------------------------------------------------
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
            "re-export it with adpo.lvlm.save_encoder or convert it with `adpo transfer convert`"
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


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of flattened embeddings."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)
