"""Prompt sets and the seeded choice of prompts per image, shared by pair generation (``adpo pairs``) and
online AdPO (``pair_source: online``), and the evaluation's default task prompts.

The AdPO paper asks open "What is in the image?"-style questions so that the clean answer describes
the image content the attack then tries to change. A run picks ``prompts_per_image`` distinct
prompts per image from one set; the choice depends only on (seed, source_id), so it is the same
whichever process, shard or resume handles the image.
"""

from __future__ import annotations

import random
from pathlib import Path

from adpo.errors import UsageError

# adpo eval's instruction per task when a config sets no prompt (the world trains its LVLMs' captions on the same one)
EVAL_TASK_PROMPTS = {"caption": "Provide a short caption for this image.", "targeted": "Describe this image."}

PROMPT_SETS: dict[str, tuple[str, ...]] = {
    # the paper's single question
    "paper": ("What is in the image?",),
    # open descriptive questions in the paper's style, for several prompts per image
    "describe": (
        "What is in the image?",
        "What is shown in this picture?",
        "Describe the image.",
        "Describe this image briefly.",
        "What can you see in this image?",
        "What objects are in the image?",
        "What does this picture show?",
        "Give a short description of the image.",
    ),
}


def resolve_prompts(prompt_set: str, prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """The prompt list a run samples from: explicit ``prompts``, else ``prompts_file``, else a named set (a bad
    one raises :class:`adpo.errors.UsageError`)."""
    if prompts:
        chosen = list(prompts)
    elif prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UsageError(f"prompts_file {prompts_file!r} does not exist; give a text file with one prompt per line")
        chosen = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not chosen:
            raise UsageError(f"prompts_file {prompts_file!r} holds no prompt; write one prompt per line")
    else:
        if prompt_set not in PROMPT_SETS:
            raise UsageError(f"prompt_set {prompt_set!r} is unknown; use one of {sorted(PROMPT_SETS)} or set `prompts`")
        chosen = list(PROMPT_SETS[prompt_set])
    if len(set(chosen)) != len(chosen):
        raise UsageError("the prompt list holds duplicates; each prompt must appear once")
    if any(not p.strip() for p in chosen):
        raise UsageError("the prompt list holds an empty prompt")
    return chosen


def prompts_for_image(prompts: list[str], count: int, seed: int, source_id: str) -> list[tuple[int, str]]:
    """``count`` distinct (index into ``prompts``, prompt) pairs for one image, fixed by (seed, source_id).

    ``random.Random`` seeded with a string hashes it with SHA-512, so the choice is stable across
    processes and Python runs (unlike ``hash()``).
    """
    if count > len(prompts):
        raise ValueError(f"prompts_per_image={count} exceeds the {len(prompts)} prompts available")
    if count == len(prompts):
        indices = list(range(len(prompts)))
    else:
        indices = sorted(random.Random(f"{seed}:{source_id}").sample(range(len(prompts)), count))
    return [(i, prompts[i]) for i in indices]
