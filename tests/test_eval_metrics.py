"""Hand-made cases with known values for adpo.eval.metrics."""

import math

import pytest

from adpo.eval.metrics import (
    CaptionScorer,
    caption_tokens,
    contains_target,
    exact_match,
    normalize_answer,
    vqa_soft_accuracy,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two dogs.", "2 dogs"),
        ("  The RED ball!\n", "red ball"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("yes, it is", "yes it is"),
        ("dont", "don't"),
        ("an apple", "apple"),
        ("left-hand", "left hand"),
        ("'quoted'", "quoted"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_uses_normalisation_and_any_reference():
    assert exact_match("Two", "2") == 1.0
    assert exact_match("a cat", ["dog", "the cat"]) == 1.0
    assert exact_match("cats", ["cat"]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        exact_match("x", [])


def test_soft_accuracy_official_values():
    # Ten human answers: k matching humans give mean over the 10 leave-one-out subsets of min(m/3, 1).
    def answers(k):
        return ["yes"] * k + ["no"] * (10 - k)

    assert vqa_soft_accuracy("yes", answers(0)) == 0.0
    # k=1: 1 subset drops the match (0), 9 keep it (1/3) -> 0.3
    assert vqa_soft_accuracy("yes", answers(1)) == pytest.approx(0.3)
    # k=2: 2 subsets with 1 match (1/3), 8 with 2 (2/3) -> 0.6
    assert vqa_soft_accuracy("yes", answers(2)) == pytest.approx(0.6)
    # k=3: 3 subsets with 2 matches (2/3), 7 with 3 (1) -> 0.9
    assert vqa_soft_accuracy("Yes.", answers(3)) == pytest.approx(0.9)
    assert vqa_soft_accuracy("yes", answers(4)) == pytest.approx(1.0)
    assert vqa_soft_accuracy("yes", answers(10)) == pytest.approx(1.0)


def test_soft_accuracy_single_answer_is_exact_match():
    assert vqa_soft_accuracy("The cat", "cat") == 1.0
    assert vqa_soft_accuracy("dog", ["cat"]) == 0.0


def test_contains_target_is_verbatim():
    assert contains_target("visit https://evil.example now", "https://evil.example") == 1.0
    assert contains_target("visit HTTPS://EVIL.EXAMPLE", "https://evil.example") == 0.0
    with pytest.raises(ValueError):
        contains_target("x", "")


def test_caption_tokens():
    assert caption_tokens("A man, riding a Horse.") == "a man riding a horse"
    assert caption_tokens("The dog's (big) ball!") == "the dog's big ball"


def test_cider_exact_unique_reference_scores_ten():
    # With two samples whose references share no n-gram, a candidate equal to its reference has cosine
    # similarity 1 for every n-gram order; CIDEr-D = 10 * mean_n cos_n = 10.
    scorer = CaptionScorer({"a": ["red square on blue"], "b": ["green circle near yellow"]})
    scores = scorer.cider({"a": "Red square on blue.", "b": "nothing matches here"})
    assert scores["a"] == pytest.approx(10.0)
    assert scores["b"] == pytest.approx(0.0)


def test_cider_is_per_sample_and_independent_of_other_predictions():
    refs = {"a": ["a red square", "red square"], "b": ["a green circle"], "c": ["a red circle"]}
    scorer = CaptionScorer(refs)
    alone = scorer.cider({"a": "a red square"})
    together = scorer.cider({"a": "a red square", "b": "blue", "c": "a red circle"})
    assert alone["a"] == pytest.approx(together["a"])
    assert together["b"] == 0.0
    # A partially right caption scores strictly between a wrong and an exact one.
    partial = scorer.cider({"a": "a red circle"})["a"]
    assert 0.0 < partial < alone["a"]


def test_bleu_and_rouge_offline_values():
    scorer = CaptionScorer({"a": ["the cat sat on the mat"], "b": ["a dog runs"]})
    bleu = scorer.bleu({"a": "the cat sat on the mat", "b": "zebra"}, n=1)
    assert bleu["a"] == pytest.approx(1.0, abs=1e-6)
    assert bleu["b"] < 1e-6
    rouge = scorer.rouge_l({"a": "the cat sat", "b": "a dog runs"})
    # LCS = 3; precision 3/3, recall 3/6; F_beta with beta=1.2: (1+b^2) P R / (R + b^2 P)
    beta2 = 1.2**2
    expected = (1 + beta2) * 1.0 * 0.5 / (0.5 + beta2 * 1.0)
    assert rouge["a"] == pytest.approx(expected)
    assert rouge["b"] == pytest.approx(1.0)


def test_caption_scorer_errors_name_the_problem():
    with pytest.raises(ValueError, match="no non-empty reference"):
        CaptionScorer({"a": ["..."]})
    scorer = CaptionScorer({"a": ["x y"]})
    with pytest.raises(KeyError, match="without references"):
        scorer.cider({"zzz": "x"})
    assert not math.isnan(scorer.cider({"a": ""})["a"])
