"""Tiny randomly initialised LLaVA models and processors for unit tests and quick benchmarks.

They are real ``LlavaForConditionalGeneration`` / ``CLIPVisionModel`` / ``LlavaProcessor`` objects built
from configs (no download), small enough that a forward and backward pass take milliseconds on a CPU.
"""

from __future__ import annotations

import copy

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

WORDS = (
    "what is in the image ? a an of on left right color shape red green blue yellow circle square triangle "
    "star one two three yes no maybe photo this it there picture describe object objects small large"
).split()

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<user> "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% else %}<assistant> {% for part in message['content'] %}{{ part['text'] }}{% endfor %} <eos> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small English vocabulary with <pad>, <unk>, <eos>, <image> and turn markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<eos>", "<image>", "<user>", "<assistant>"]
    vocab = {token: i for i, token in enumerate(specials + list(dict.fromkeys(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
        additional_special_tokens=["<image>", "<user>", "<assistant>"],
    )
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_vision_config(image_size: int = 32, patch_size: int = 8, hidden_size: int = 32, layers: int = 3) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, hidden_act="quick_gelu", projection_dim=hidden_size,
    )


def tiny_image_processor(image_size: int = 32) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def tiny_llava(
    seed: int = 0,
    text_hidden_size: int = 48,
    text_layers: int = 2,
    vision_config: CLIPVisionConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A tiny random LLaVA-1.5-style model (feature layer -2, CLS dropped, GELU projector) and its processor.

    Two calls with different ``text_hidden_size``/``text_layers`` but the same ``vision_config`` give two
    "LLM sizes" sharing one encoder geometry (what grafting needs).
    """
    tokenizer = tiny_tokenizer()
    vision = vision_config or tiny_vision_config()
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=tiny_image_processor(vision.image_size), tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
    )
    return model, processor


def random_pixels(batch: int = 2, image_size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random pixel-space images in [0, 1] that are exact multiples of 1/255 (as real images are)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, image_size, image_size), generator=generator).float() / 255


# ----------------------------------------------------------------------------------------------------
# Real chat templates on small trained tokenizers: the encoding conformance matrix
# ----------------------------------------------------------------------------------------------------
# llava-hf/llava-1.5-*-hf's template: "USER: <image>\n{question} ASSISTANT:" for the prompt; the assistant
# turn renders "{answer} " with no end-of-sequence token (LLaVA-1.5 was trained on "... ASSISTANT: {answer}</s>").
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# A Mistral-instruct-style template: "[INST] <image>\n{question} [/INST]" and the assistant turn " {answer}</s>".
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{ ' [/INST]' }}{% else %}{{ ' ' + message['content'][0]['text'] + eos_token }}{% endif %}{% endfor %}"
)
# ChatML (Qwen-style): no BOS; every turn ends with <|im_end|> and a newline.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATE_STYLES = ("llava15", "mistral", "chatml", "tiny")

_CORPUS = (
    "USER: ASSISTANT: [INST] [/INST] user assistant system " + " ".join(WORDS)
    + " The image shows a red circle on the left and a blue square on the right. Yes, it is. No. "
    "What color is the shape? Describe the picture in one sentence. Two small objects, one large star."
)


def _trained_bpe(style: str, vocab_size: int = 400) -> tuple[dict[str, int], list]:
    """Vocabulary and merges of a small BPE trained on :data:`_CORPUS` with ``style``'s pre-tokenisation:
    SentencePiece-like Metaspace with byte fallback ("llama", as Llama-2 / Mistral) or GPT-2 byte level ("bytelevel")."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if style == "llama":
        specials = ["<unk>", "<s>", "</s>"]
        backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
        alphabet = []
    else:
        specials = ["<|endoftext|>"]
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    backend.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = dict(model["vocab"])
    if style == "llama":  # byte-fallback pieces, as SentencePiece vocabularies carry them
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return vocab, [tuple(merge) for merge in model["merges"]]


def template_tokenizer(style: str):
    """A small trained tokenizer with ``style``'s real tokenisation rules and chat template.

    ``llava15``: a Llama-2 tokenizer (BPE + byte fallback, adds ``<s>``) with llava-hf's LLaVA-1.5 template;
    ``mistral``: the same tokenizer with a Mistral-instruct template; ``chatml``: a Qwen2 byte-level BPE (no BOS,
    ``<|im_end|>`` ends a turn) with ChatML; ``tiny``: :func:`tiny_tokenizer` and :data:`CHAT_TEMPLATE`.
    Returns ``(tokenizer, chat_template, end_of_turn_token)``.
    """
    from transformers import LlamaTokenizer, Qwen2Tokenizer

    if style == "tiny":
        return tiny_tokenizer(), CHAT_TEMPLATE, "<eos>"
    if style in ("llava15", "mistral"):
        vocab, merges = _trained_bpe("llama")
        tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_bos_token=True, add_eos_token=False)
        tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
        template = LLAVA15_CHAT_TEMPLATE if style == "llava15" else MISTRAL_CHAT_TEMPLATE
        end_of_turn = "</s>"
    elif style == "chatml":
        vocab, merges = _trained_bpe("bytelevel")
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
        tokenizer.add_special_tokens({"eos_token": "<|im_end|>",
                                      "additional_special_tokens": ["<|im_start|>", "<image>"]})
        template, end_of_turn = CHATML_CHAT_TEMPLATE, "<|im_end|>"
    else:
        raise ValueError(f"unknown template style {style!r}; use one of {TEMPLATE_STYLES}")
    tokenizer.padding_side = "left"
    return tokenizer, template, end_of_turn


def template_llava(style: str, seed: int = 0, vision_config: CLIPVisionConfig | None = None,
                   text_hidden_size: int = 48, text_layers: int = 2, text_config=None):
    """A tiny random LLaVA whose processor has ``style``'s tokenizer and chat template (see :func:`template_tokenizer`).

    ``text_config`` (e.g. a ``MistralConfig`` at a real model's width) replaces the tiny Llama LM; its vocabulary
    size and special-token ids are set from the tokenizer."""
    tokenizer, template, end_of_turn = template_tokenizer(style)
    vision = vision_config or tiny_vision_config()
    eos_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    if text_config is None:
        text = LlamaConfig(
            hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size, num_hidden_layers=text_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )
    else:
        text = copy.deepcopy(text_config)  # the caller's config stays as given
    text.vocab_size, text.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    text.eos_token_id, text.bos_token_id = eos_id, tokenizer.bos_token_id
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=tiny_image_processor(vision.image_size), tokenizer=tokenizer, patch_size=vision.patch_size,
        vision_feature_select_strategy="default", chat_template=template, num_additional_image_tokens=1,
    )
    return model, processor


def launch_two_cpu_processes(trainer_module: str, config, cwd):
    """Run ``trainer_module`` (e.g. ``trainers.adpo``) under ``accelerate launch -m`` as two CPU processes (gloo) with
    ``--config config``, the way a multi-device run starts; returns the finished ``subprocess.CompletedProcess``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    # The checkout under test, also where an editable install of another checkout would win.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", trainer_module, "--config", str(config)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
