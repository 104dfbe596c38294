"""Prompt and answer encoding across real chat-template families (LLaVA-1.5/Vicuna, Mistral, ChatML, adpo's tiny one).

What an attack or a preference loss scores must be what the model was trained on and what generation produces:
the processor's prompt ids (BOS included) followed by the answer's tokens and the end-of-turn token, nothing else.
"""

import pytest
import torch

from adpo.attacks import apgd
from adpo.lvlm import LlavaView
from adpo.objectives import LanguageModelLoss
from adpo.testing import TEMPLATE_STYLES, random_pixels, template_llava, template_tokenizer
from adpo.threat import ThreatModel

QUESTIONS = ["What color is the shape?", "Describe the picture in one sentence."]
ANSWERS = ["red circle", "Two small objects, one large star."]


@pytest.fixture(scope="module", params=TEMPLATE_STYLES)
def styled(request):
    model, processor = template_llava(request.param)
    return request.param, model, processor


def _answer_tokens(view: LlavaView, encoded, row: int) -> list[int]:
    return encoded.input_ids[row][encoded.labels[row] != -100].tolist()


def test_prompt_ids_equal_the_processors(styled):
    style, model, processor = styled
    view = LlavaView(model, processor)
    image = random_pixels(1, image_size=model.config.vision_config.image_size)[0]
    for question in QUESTIONS:
        ours = view.encode([question]).input_ids[0].tolist()
        theirs = processor(images=[image], text=view.format_prompt(question), return_tensors="pt",
                           do_rescale=False)["input_ids"][0].tolist()
        assert ours == theirs
    tokenizer = processor.tokenizer
    if tokenizer.bos_token is not None:  # llava-hf's template writes no <s>: the tokenizer must add it
        assert ours[0] == tokenizer.bos_token_id and ours[1] != tokenizer.bos_token_id


def test_labels_are_the_answer_and_the_end_of_turn_token(styled):
    style, model, processor = styled
    view = LlavaView(model, processor)
    _, _, end_of_turn = template_tokenizer(style)
    end_id = processor.tokenizer.convert_tokens_to_ids(end_of_turn)
    encoded = view.encode(QUESTIONS, ANSWERS)
    for row, answer in enumerate(ANSWERS):
        tokens = _answer_tokens(view, encoded, row)
        assert tokens[-1] == end_id
        assert end_id not in tokens[:-1]
        decoded = processor.tokenizer.decode(tokens[:-1])
        if style == "tiny":  # a whitespace word-level vocabulary: unknown words decode as <unk>
            assert len(tokens) - 1 == len(answer.split())
        else:
            assert decoded.strip() == answer
            # nothing but the answer: no stray whitespace token before the end of turn
            assert processor.tokenizer.decode(tokens[-2:-1]).strip() != ""


def test_llava15_answer_ends_with_eos_not_a_stray_space():
    model, processor = template_llava("llava15")
    view = LlavaView(model, processor)
    tokenizer = processor.tokenizer
    encoded = view.encode(["What color is the shape?"], ["red circle"])
    tokens = tokenizer.convert_ids_to_tokens(_answer_tokens(view, encoded, 0))
    assert tokens == ["▁red", "▁circle", "</s>"]
    # The whole row is the conversation LLaVA-1.5 was trained on, tokenised in one piece.
    whole = tokenizer(view.format_prompt("What color is the shape?").replace(
        view.image_token, view.image_token * view.tower.num_image_tokens()) + " red circle</s>")["input_ids"]
    assert encoded.input_ids[0].tolist() == whole


def _allow_only_words_and_eos(model, processor, words, eos_bias: float) -> None:
    """Give the LM head a bias that leaves only whole-word tokens and the end-of-turn token reachable, so a random
    model's greedy answers are words that re-tokenise to themselves, ending where ``eos_bias`` makes it stop."""
    head = model.get_output_embeddings()
    tokenizer = processor.tokenizer
    allowed = [i for i in (tokenizer.convert_tokens_to_ids(w) for w in words) if i != tokenizer.unk_token_id]
    eos = model.generation_config.eos_token_id
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.fill_(-1e4)
        biased.bias[allowed] = 0.0
        biased.bias[eos] = eos_bias
    model.set_output_embeddings(biased)


@pytest.mark.parametrize("style", ["llava15", "mistral", "tiny"])
def test_an_attack_on_the_models_own_answer_starts_unbroken_and_takes_steps(style):
    """Reference answer = the model's own greedy answer: the LM-loss objective must call no sample broken on the
    clean image, so untargeted APGD with early stop takes at least one step on every sample."""
    words = ["red", "blue", "circle", "square", "star"]
    words = words if style == "tiny" else ["▁" + w for w in words]
    questions = ["What color is the shape?"] * 4
    pixels = random_pixels(4, image_size=32, seed=3)

    def answers_end(model, processor, view) -> bool:
        encoded = view.encode(questions)
        out = model.generate(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                             pixel_values=view.tower.normalize(pixels), max_new_tokens=8, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
        eos = model.generation_config.eos_token_id
        return all(int((row == eos).nonzero()[0]) > 0 if (row == eos).any() else False
                   for row in out[:, encoded.input_ids.shape[1]:])

    # A random LM's logit margins are ~0.05: search a model seed and an EOS bias that make every answer end.
    found = None
    for seed in range(4):
        model, processor = template_llava(style, seed=seed)
        view = LlavaView(model, processor)
        for eos_bias in torch.linspace(-0.3, 0.3, 121).tolist():
            _allow_only_words_and_eos(model, processor, words, eos_bias)
            if answers_end(model, processor, view):
                found = seed
                break
        if found is not None:
            break
    assert found is not None, "no seed and bias made every greedy answer end after at least one word"
    eos = model.generation_config.eos_token_id
    encoded = view.encode(questions)
    new = model.generate(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask,
                         pixel_values=view.tower.normalize(pixels), max_new_tokens=8, do_sample=False,
                         pad_token_id=processor.tokenizer.pad_token_id)[:, encoded.input_ids.shape[1]:]
    answers = view.generate(pixels, questions, max_new_tokens=8)
    assert all(answers)
    labelled = view.encode(questions, answers)
    for row, generated in enumerate(new):
        stop = int((generated == eos).nonzero()[0])
        assert _answer_tokens(view, labelled, row) == generated[: stop + 1].tolist()
    objective = LanguageModelLoss(view, labelled.input_ids, labelled.attention_mask, labelled.labels)
    assert not objective.evaluate(pixels).success.any()
    result = apgd(objective, pixels, ThreatModel(norm="linf", eps=8 / 255), 4,
                  generator=torch.Generator().manual_seed(0))
    assert (result.steps_run >= 1).all()


def test_the_report_attacks_every_sample_whose_reference_is_its_own_answer():
    """End to end on llava-hf's template: the evaluation's robust accuracy is at most the clean one and every
    sample took gradient steps (on the old encoding every sample counted as broken before the attack: robust = clean,
    zero steps)."""
    from adpo.eval.config import EvalConfig
    from adpo.eval.adapters import GenerativeModel
    from adpo.eval.protocol import run_protocol
    from adpo.eval.tasks import Sample

    model, processor = template_llava("llava15", seed=0)
    view = LlavaView(model, processor)
    pixels = random_pixels(4, image_size=32, seed=3)
    questions = ["What color is the shape?"] * 4
    for eos_bias in torch.linspace(-0.3, 0.3, 121).tolist():
        _allow_only_words_and_eos(model, processor, ["▁red", "▁blue", "▁circle", "▁square", "▁star"], eos_bias)
        answers = view.generate(pixels, questions, max_new_tokens=8)
        if all(answers) and all(len(view.encode([q], [a]).labels[0].ne(-100).nonzero()) < 8 for q, a in zip(questions, answers)):
            break
    samples = [Sample(f"s{i}", None, q, [a]) for i, (q, a) in enumerate(zip(questions, answers))]
    config = EvalConfig(model="tiny", data="world:test", task="vqa", attack_eps=["8/255"], attack_steps=3, step_check_steps=0, num_examples=0,
                        precision_schedule=["float32"], batch_size=8, vqa_targets=[], max_new_tokens=8)
    report = run_protocol(config, GenerativeModel(view, 8), samples, pixels, write=False)
    assert report["clean"]["exact_match"] == 1.0
    assert report["robust"][0]["metrics"]["exact_match"] <= report["clean"]["exact_match"]
    assert all(sample["robust"]["8/255"]["steps"] >= 1 for sample in report["samples"])
    assert {c["check"]: c["status"] for c in report["sanity"]}["attack_took_steps"] == "pass"
