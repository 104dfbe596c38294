"""The text threat model and the HotFlip attack on a tiny random CLIP with the world's word-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import CLIPModel

from adpo.errors import UsageError
from adpo.text_attacks import (
    TextRetrievalCrossEntropy,
    TextThreatModel,
    ZeroShotTextCrossEntropy,
    clip_text_tower,
    text_attack,
)
from adpo.world.clip import WorldClipSize, build_world_clip_config, build_world_processor
from adpo.world.data import world_vocabulary

TINY = WorldClipSize(vision_hidden=32, vision_layers=1, vision_heads=4, vision_intermediate=64, text_hidden=32,
                     text_layers=1, text_heads=4, text_intermediate=64, projection_dim=16)


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    torch.manual_seed(0)
    tokenizer = build_world_processor().tokenizer
    return CLIPModel(build_world_clip_config(tokenizer, TINY)).eval(), tokenizer


def _zero_shot_objective(clip, tokenizer, encoded, labels, seed=0):
    text_fn, table = clip_text_tower(clip)
    with torch.no_grad():
        classes = text_fn(encoded["input_ids"], encoded["attention_mask"])
    images = torch.randn(len(labels), classes.shape[1], generator=torch.Generator().manual_seed(seed))
    return ZeroShotTextCrossEntropy(text_fn, table, images, classes, torch.tensor(labels), 100.0, modules=(clip,))


sentences = st.lists(st.lists(st.sampled_from(world_vocabulary()), min_size=1, max_size=6), min_size=1, max_size=3)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(words=sentences, k=st.integers(1, 3), beam=st.integers(1, 2), rule=st.sampled_from(["words", "vocabulary"]),
       early_stop=st.booleans(), protected=st.lists(st.sampled_from(world_vocabulary()), max_size=8))
def test_perturbed_text_differs_in_at_most_k_positions_and_only_by_allowed_candidates(clip_and_tokenizer, words, k, beam,
                                                                                      rule, early_stop, protected):
    clip, tokenizer = clip_and_tokenizer
    encoded = tokenizer([" ".join(w) for w in words], padding=True, return_tensors="pt")
    threat = TextThreatModel(max_substitutions=k, candidates=rule, shortlist=8, beam_width=beam)
    allowed = threat.allowed_tokens(tokenizer, protected)
    editable = threat.editable_positions(encoded["input_ids"], encoded["attention_mask"], tokenizer, protected)
    objective = _zero_shot_objective(clip, tokenizer, encoded, list(range(len(words))))
    result = text_attack(objective, encoded["input_ids"], encoded["attention_mask"], threat, allowed, editable,
                         early_stop=early_stop)
    protected_ids = set(tokenizer.convert_tokens_to_ids(protected))

    assert result.input_ids.shape == encoded["input_ids"].shape
    changed = result.input_ids != encoded["input_ids"]
    assert bool((changed.sum(dim=1) <= k).all())
    assert torch.equal(changed.sum(dim=1), result.substitutions)
    special = set(tokenizer.all_special_ids)
    vocabulary = {index: token for token, index in tokenizer.get_vocab().items()}
    for row, column in changed.nonzero().tolist():
        assert encoded["attention_mask"][row, column] == 1
        assert int(encoded["input_ids"][row, column]) not in special  # BOS / EOS / padding are never edited
        new = int(result.input_ids[row, column])
        assert new not in special
        assert new not in protected_ids and int(encoded["input_ids"][row, column]) not in protected_ids
        if rule == "words":
            assert vocabulary[new].isalpha(), vocabulary[new]
    assert bool(threat.contains(result.input_ids, encoded["input_ids"], editable, allowed).all())
    # the returned value is the true objective at the returned text, and never below the clean text's
    with torch.no_grad():
        clean = objective.evaluate(encoded["input_ids"], encoded["attention_mask"]).values
        at_result = objective.evaluate(result.input_ids, encoded["attention_mask"]).values
    assert torch.allclose(at_result, result.values, atol=1e-4)
    if not early_stop:
        assert bool((result.values >= clean - 1e-5).all())


def test_one_substitution_with_a_full_shortlist_finds_the_exhaustive_optimum(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    encoded = tokenizer(["a photo of a red circle", "a blue star"], padding=True, return_tensors="pt")
    threat = TextThreatModel(max_substitutions=1, shortlist=10_000)
    allowed = threat.allowed_tokens(tokenizer)
    editable = threat.editable_positions(encoded["input_ids"], encoded["attention_mask"], tokenizer)
    objective = _zero_shot_objective(clip, tokenizer, encoded, [0, 1])
    result = text_attack(objective, encoded["input_ids"], encoded["attention_mask"], threat, allowed, editable,
                         early_stop=False)
    for row in range(2):
        variants = [encoded["input_ids"][row].clone()]  # the clean text, then every single substitution
        for position in editable[row].nonzero().flatten().tolist():
            for token in allowed.nonzero().flatten().tolist():
                variants.append(encoded["input_ids"][row].clone())
                variants[-1][position] = token
        ids = torch.stack(variants)
        owner = torch.full((len(ids),), row)
        with torch.no_grad():
            best = objective.subset(owner).evaluate(ids, encoded["attention_mask"][owner]).values.max().item()
        assert result.values[row].item() == pytest.approx(best, abs=1e-4)


def test_early_stop_returns_a_succeeding_text_and_retrieval_objective_counts_success(clip_and_tokenizer):
    clip, tokenizer = clip_and_tokenizer
    encoded = tokenizer(["a photo of a red circle", "a blue star", "two green objects"], padding=True, return_tensors="pt")
    text_fn, table = clip_text_tower(clip)
    gallery = torch.randn(3, TINY.projection_dim, generator=torch.Generator().manual_seed(3))
    objective = TextRetrievalCrossEntropy(text_fn, table, gallery, torch.arange(3), 100.0, modules=(clip,))
    threat = TextThreatModel(max_substitutions=3, shortlist=64)
    allowed = threat.allowed_tokens(tokenizer)
    editable = threat.editable_positions(encoded["input_ids"], encoded["attention_mask"], tokenizer)
    result = text_attack(objective, encoded["input_ids"], encoded["attention_mask"], threat, allowed, editable)
    with torch.no_grad():
        check = objective.evaluate(result.input_ids, encoded["attention_mask"])
    assert torch.equal(check.success, result.success)
    assert bool(result.success.any())
    assert not any(p.grad is not None for p in clip.parameters())  # the model's parameters collect no gradient


@pytest.mark.parametrize("options, message", [
    ({"max_substitutions": 0}, "max_substitutions=0"),
    ({"shortlist": -1}, "shortlist=-1"),
    ({"beam_width": 1.5}, "beam_width=1.5"),
    ({"candidates": "bert"}, "candidates='bert'"),
])
def test_bad_text_threat_settings_are_usage_errors(options, message):
    with pytest.raises(UsageError, match=message):
        TextThreatModel(**options)
