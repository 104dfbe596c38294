"""Answer and caption metrics: VQA exact match and soft accuracy, CIDEr, BLEU, ROUGE-L, target-string hits.

Everything here is pure Python and works offline. The captioning metrics use pycocoevalcap's scorers
(CIDEr-D, BLEU, ROUGE-L) but *not* its PTB tokenizer, which needs Java; ``caption_tokens`` below is a
small replacement that lower-cases, drops the punctuation the PTB tokenizer drops, and splits on spaces.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# -- VQA answer normalisation ------------------------------------------------------------------------
# Follows the steps of the official VQA evaluation: lower-case, strip punctuation (keeping decimal
# points and digit grouping), number words to digits, drop articles, restore common contractions.

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Apostrophe-less spellings that annotators type, mapped to the contracted form.
_CONTRACTIONS = {
    "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
    "shouldnt": "shouldn't", "wasnt": "wasn't", "werent": "weren't", "wont": "won't",
    "wouldnt": "wouldn't", "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're",
    "thats": "that's", "whats": "what's", "lets": "let's", "its": "it's",
}
_PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!*#%^&$~|:'")
# A period is punctuation unless it sits between digits (3.5 stays 3.5).
_PERIOD_NOT_DECIMAL = re.compile(r"(?<!\d)\.(?!\d)")
# A comma between digits is digit grouping (1,000 -> 1000).
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")


def normalize_answer(answer: str) -> str:
    """Normalise a short answer the way the VQA evaluation does, e.g. ``"Two dogs."`` -> ``"2 dogs"``."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    # Apostrophes inside words survive (so contractions can be matched); other punctuation becomes a space.
    text = "".join(" " if ch in _PUNCTUATION and ch != "'" else ch for ch in text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def _as_list(answers: str | Sequence[str]) -> list[str]:
    return [answers] if isinstance(answers, str) else list(answers)


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference answer, else 0.0."""
    references = {normalize_answer(a) for a in _as_list(answers)}
    if not references:
        raise ValueError("exact_match needs at least one reference answer; got an empty list.")
    return float(normalize_answer(prediction) in references)


def vqa_soft_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQAv2 accuracy: ``min(#humans that gave the answer / 3, 1)``, averaged over leave-one-out subsets.

    With VQAv2's ten human answers this is the official metric: each of the ten 9-answer subsets scores
    ``min(matches / 3, 1)`` and the ten scores are averaged (so 3 matching humans give 0.9, 4 give 1.0).
    The same leave-one-out average is used for any number of answers ``n >= 2``; a single reference
    answer reduces to exact match.
    """
    references = [normalize_answer(a) for a in _as_list(answers)]
    if not references:
        raise ValueError("vqa_soft_accuracy needs at least one reference answer; got an empty list.")
    predicted = normalize_answer(prediction)
    if len(references) == 1:
        return float(predicted == references[0])
    matches = sum(ref == predicted for ref in references)
    total = 0.0
    for ref in references:
        matches_in_subset = matches - (ref == predicted)
        total += min(matches_in_subset / 3.0, 1.0)
    return total / len(references)


def contains_target(output: str, target: str) -> float:
    """Targeted-attack success: 1.0 when the target string occurs verbatim in the model's output."""
    if not target:
        raise ValueError("contains_target needs a non-empty target string.")
    return float(target in output)


# -- Captioning ---------------------------------------------------------------------------------------

# Tokens the PTB tokenizer of the COCO caption evaluation removes after tokenising.
_CAPTION_PUNCTUATION = re.compile(r"[.?!,:;\-\(\)\[\]\{\}\"`]|'(?!\w)|(?<!\w)'")


def caption_tokens(caption: str) -> str:
    """Java-free stand-in for the COCO PTB tokenizer: lower-case, punctuation dropped, single spaces.

    Differs from PTB only in keeping contractions whole (``"don't"`` instead of ``"do n't"``), which
    affects references and candidates alike.
    """
    return " ".join(_CAPTION_PUNCTUATION.sub(" ", caption.lower()).split())


class CaptionScorer:
    """Corpus-level caption metrics against a fixed set of references.

    CIDEr's n-gram weights (document frequencies) come from the references only, so a sample's CIDEr
    is a fixed function of its caption once the reference corpus is fixed: clean and adversarial
    captions of the same sample are directly comparable. Scores are in pycocoevalcap units (papers
    report CIDEr x 100).
    """

    def __init__(self, references: Mapping[str, Sequence[str]]):
        if not references:
            raise ValueError("CaptionScorer needs references for at least one sample.")
        self.references: dict[str, list[str]] = {}
        for sample_id, captions in references.items():
            tokenized = [caption_tokens(c) for c in _as_list(captions)]
            tokenized = [c for c in tokenized if c]
            if not tokenized:
                raise ValueError(f"Sample {sample_id!r} has no non-empty reference caption.")
            self.references[str(sample_id)] = tokenized

    def _inputs(self, predictions: Mapping[str, str]) -> tuple[dict, dict, list[str]]:
        unknown = set(map(str, predictions)) - set(self.references)
        if unknown:
            raise KeyError(f"Predictions for samples without references: {sorted(unknown)[:5]}")
        ids = [str(i) for i in predictions]
        # The scorers need every hypothesis to be a non-empty string after tokenising.
        res = {i: [caption_tokens(predictions[i]) or "<empty>"] for i in ids}
        gts = {i: self.references[i] for i in ids}
        return gts, res, ids

    def cider(self, predictions: Mapping[str, str]) -> dict[str, float]:
        """Per-sample CIDEr-D, with document frequencies taken from the *whole* reference corpus."""
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        _, res, ids = self._inputs(predictions)
        scorer = CiderScorer(n=4, sigma=6.0)
        for sample_id, captions in self.references.items():
            # Samples without a prediction still contribute their references to the n-gram statistics.
            scorer += (res[sample_id][0] if sample_id in res else "<empty>", captions)
        _, scores = scorer.compute_score()
        by_id = dict(zip(self.references, (float(s) for s in scores)))
        return {i: by_id[i] for i in ids}

    def bleu(self, predictions: Mapping[str, str], n: int = 4) -> dict[str, float]:
        """Per-sample BLEU-n (sentence-level, closest reference length)."""
        from pycocoevalcap.bleu.bleu import Bleu

        gts, res, ids = self._inputs(predictions)
        _, scores = Bleu(n).compute_score(gts, res, verbose=0)
        return {i: float(s) for i, s in zip(ids, scores[n - 1])}

    def corpus_bleu(self, predictions: Mapping[str, str], n: int = 4) -> float:
        """Corpus BLEU-n: n-gram matches and lengths pooled over all samples (the number papers report)."""
        from pycocoevalcap.bleu.bleu import Bleu

        gts, res, _ = self._inputs(predictions)
        score, _ = Bleu(n).compute_score(gts, res, verbose=0)
        return float(score[n - 1])

    def rouge_l(self, predictions: Mapping[str, str]) -> dict[str, float]:
        """Per-sample ROUGE-L (F-measure with beta = 1.2, best over references)."""
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res, ids = self._inputs(predictions)
        _, scores = Rouge().compute_score(gts, res)
        return {i: float(s) for i, s in zip(ids, scores)}


def mean(values: Sequence[float]) -> float:
    """Mean of a non-empty sequence (NaN for an empty one, so an empty split never reads as 0 %)."""
    return float(sum(values) / len(values)) if len(values) else float("nan")
