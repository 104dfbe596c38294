"""Tiny randomly initialised LLaVA models and processors for unit tests and quick benchmarks.

They are real ``LlavaForConditionalGeneration`` / ``CLIPVisionModel`` / ``LlavaProcessor`` objects built
from configs (no download), small enough that a forward and backward pass take milliseconds on a CPU.
"""

from __future__ import annotations

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
