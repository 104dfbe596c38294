"""The LLaVA view: a LLaVA-family model driven by pixel-space images (:class:`LlavaView`) — prompt encoding with
answer labels, per-answer log-probabilities (LM head applied only where needed), and generation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers import PreTrainedModel

from adpo.tower import VisionTower


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
