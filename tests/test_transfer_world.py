"""Bundled world: the small LVLM's encoder grafted into the large LVLM."""

import pytest

from adpo.encoder_io import export_encoder
from adpo.tower import find_vision_tower
from transfer.graft import Donor, graft_encoder, state_hash
from transfer.verify import answer_agreement, generate_answers, load_samples

pytestmark = pytest.mark.world


def test_small_world_encoder_into_large_world_lvlm_keeps_clean_vqa():
    from adpo.world import load_world_lvlm

    small, small_processor = load_world_lvlm("small")
    large, large_processor = load_world_lvlm("large")
    unchanged = state_hash(find_vision_tower(small).state_dict()) == state_hash(find_vision_tower(large).state_dict())
    samples = load_samples("world:test", 16)
    original = generate_answers(large, large_processor, samples, max_new_tokens=6, batch_size=8)
    image_processor = small_processor.image_processor
    donor = Donor(export_encoder(small), list(image_processor.image_mean), list(image_processor.image_std), image_processor)
    outcome = graft_encoder(large, large_processor, donor)
    assert outcome.hashes_before["language_model"] == outcome.hashes_after["language_model"]
    grafted = generate_answers(large, large_processor, samples, max_new_tokens=6, batch_size=8)
    result = answer_agreement(original, grafted, samples)
    if unchanged:  # the world's two LVLMs share one encoder: the graft must change nothing at all
        assert outcome.hashes_before == outcome.hashes_after
        assert result["answer_agreement_exact"] == 1.0
        assert result["vqa_accuracy_grafted"] == result["vqa_accuracy_original"]
    else:  # another encoder of the same geometry: clean VQA may move by at most 2 of the 16 questions
        assert result["vqa_accuracy_grafted"] >= result["vqa_accuracy_original"] - 2 / 16
