"""``adpo transfer``: graft an encoder into an LVLM (and verify it); ``adpo transfer convert``: formats.

    adpo transfer --encoder DIR|FILE|LVLM --target MODEL --out DIR [--config configs/transfer/X.yaml]
    adpo transfer convert --from-open-clip FILE --activation quick_gelu --out ENCODER_DIR
    adpo transfer convert --to-open-clip ENCODER_DIR --out FILE.safetensors

A bad key or value raises :class:`adpo.errors.UsageError` before any model loads (:func:`validate`); errors met
while grafting or converting print one line and exit with code 1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from adpo.errors import UsageError, parse_config
from adpo.plugins import plugin_data_hint, plugin_model_hint

# OpenAI CLIP's normalisation constants (also LLaVA-1.5's, FARE's and TeCoA's).
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class TransferConfig:
    encoder: str = field(metadata={"help": f"donor: encoder directory, open_clip .safetensors/.pt file, or an LVLM (dir, hub id){plugin_model_hint('lvlm')}"})
    target: str = field(metadata={"help": f"target LVLM: hub id or local directory{plugin_model_hint('lvlm')}"})
    out: str = field(metadata={"help": "output model directory (written atomically)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})
    check_only: bool = field(default=False, metadata={"help": "print the geometry checks and exit (0 = compatible)"})
    dtype: str | None = field(default=None, metadata={"help": "load the target in this dtype (float32, bfloat16, float16)"})
    device: str | None = field(default=None, metadata={"help": "device for the target (e.g. cuda); default: as loaded"})
    # donor description (open_clip files carry no config)
    activation: str | None = field(default=None, metadata={"help": "open_clip donors: quick_gelu (OpenAI CLIP, FARE, TeCoA) or gelu (LAION)"})
    num_attention_heads: int | None = field(default=None, metadata={"help": "open_clip donors: head count (default hidden/64)"})
    donor_image_mean: list[float] | None = field(default=None, metadata={"help": "the donor's normalisation mean, if it ships none"})
    donor_image_std: list[float] | None = field(default=None, metadata={"help": "the donor's normalisation std, if it ships none"})
    # explicit fixes
    interpolate_positions: bool = field(default=False, metadata={"help": "bicubically resample donor position embeddings to the target's grid"})
    fold_normalisation: bool = field(default=False, metadata={"help": "fold a mean/std difference into the patch embedding"})
    adopt_donor_activation: bool = field(default=False, metadata={"help": "run the grafted tower with the donor's activation"})
    adopt_donor_layer_norm_eps: bool = field(default=False, metadata={"help": "run the grafted tower with the donor's layer-norm eps"})
    # verification
    verify_data: str | None = field(default=None, metadata={"help": "a saved HF dataset (VQA: set question_column and answers_column), an "
                                                                    f"image folder or a COCO captions .json{plugin_data_hint()}"})
    question_column: str | None = field(default=None, metadata={"help": "saved HF dataset verify_data: the question column (one "
                                                                        "question per row), as in adpo eval"})
    answers_column: str | None = field(default=None, metadata={"help": "saved HF dataset verify_data: the reference answers (a list, "
                                                                       "VQAv2's answer dicts, or one string), as in adpo eval"})
    question_suffix: str = field(default="", metadata={"help": "appended to each question of verify_data, as in adpo eval (e.g. "
                                                               "' Answer the question using a single word or phrase.')"})
    pad_to_square: bool = field(default=False, metadata={"help": "pad each image to a square in the processor's mean colour before "
                                                                 "resizing, as original LLaVA-1.5 does (llava-hf's processor centre-crops)"})
    verify_samples: int = field(default=32, metadata={"help": "number of images to verify on"})
    max_new_tokens: int = 16
    batch_size: int = 8
    feature_shift_eps: str | None = field(default="4/255", metadata={
        "help": "measure how far a feature-space attack in this eps ball moves the projector's output, before and after "
                "the graft (cheap: tower and projector only); \"\" or null in YAML skips it"})
    feature_shift_steps: int = 10
    robust_eps: str | None = field(default=None, metadata={"help": "also measure robust VQA accuracy at this eps (e.g. 4/255)"})
    robust_norm: str = field(default="linf", metadata={"help": "the ball of the robust and feature-shift measures: linf or l2"})
    robust_steps: int = 10
    # projector re-alignment (reported separately; saved to its own directory)
    realign_out: str | None = field(default=None, metadata={"help": "also save a projector-re-aligned copy here"})
    realign_data: str | None = field(default=None, metadata={"help": f"caption data: a datasets directory{plugin_data_hint()}"})
    realign_caption_column: str | None = field(default=None, metadata={"help": "caption column of a saved HF dataset"})
    realign_samples: int = 256
    realign_steps: int = 100
    realign_learning_rate: float = 1e-4
    realign_batch_size: int = 8
    seed: int = 0


@dataclass
class ConvertConfig:
    out: str = field(metadata={"help": "encoder directory (from open_clip) or .safetensors file (to open_clip)"})
    from_open_clip: str | None = field(default=None, metadata={"help": "open_clip visual (or full CLIP) state dict file"})
    to_open_clip: str | None = field(default=None, metadata={"help": "CLIPVisionModel directory to export as open_clip"})
    activation: str | None = field(default=None, metadata={"help": "quick_gelu (OpenAI CLIP, FARE, TeCoA) or gelu (LAION)"})
    num_attention_heads: int | None = None
    image_mean: list[float] | None = field(default=None, metadata={"help": "normalisation the encoder was trained with"})
    image_std: list[float] | None = None
    openai_normalisation: bool = field(default=False, metadata={"help": "shorthand for OpenAI CLIP's mean/std"})


def _parse(dataclass_type, argv: list[str], prog: str):
    (config,) = parse_config([dataclass_type], argv, prog=prog)
    return config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "convert":
            return convert(_parse(ConvertConfig, argv[1:], "adpo transfer convert"))
        config = _parse(TransferConfig, argv, "adpo transfer")
        validate(config)
        return transfer(config)
    except UsageError:
        raise  # the process entry point prints it as one line, exit code 2
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"adpo transfer: {error}", file=sys.stderr)
        return 1


def validate(config: TransferConfig) -> None:
    """Every check that needs no model, run before the target loads: a UsageError naming the key and the fix."""
    from adpo.io import check_writable
    from adpo.plugins import data_plugin
    from adpo.sources import check_source
    from adpo.threat import NORMS, parse_radius

    for key in ("encoder", "target"):
        value = getattr(config, key)
        if value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
            raise UsageError(f"{key}={value!r} looks like a path but does not exist; pass an existing directory or file")
    if config.realign_out and not config.realign_data:
        raise UsageError("realign_out needs realign_data (caption data other than the verification images, e.g. a plugin's "
                         "train split)")
    if bool(config.question_column) != bool(config.answers_column):
        raise UsageError("set both question_column and answers_column (the VQA columns of verify_data), or neither")
    if config.robust_eps and config.verify_data and not (data_plugin(config.verify_data) or config.answers_column):
        raise UsageError(f"robust_eps needs reference answers but verify_data {config.verify_data!r} has none named: set "
                         "question_column and answers_column to its VQA columns (a saved HF dataset), use a plugin's data "
                         "with questions, or drop robust_eps")
    if config.robust_norm not in NORMS:
        raise UsageError(f"robust_norm={config.robust_norm!r}; use one of {NORMS}")
    for key in ("feature_shift_eps", "robust_eps"):
        if getattr(config, key):
            parse_radius(getattr(config, key), key, config.robust_norm)
    for key in ("verify_samples", "max_new_tokens", "batch_size", "feature_shift_steps", "robust_steps", "realign_samples",
                "realign_steps", "realign_batch_size"):
        if getattr(config, key) < 1:
            raise UsageError(f"{key}={getattr(config, key)}; must be >= 1")
    if config.verify_data:
        check_source(config.verify_data, "verify_data", columns={"question_column": config.question_column,
                                                                  "answers_column": config.answers_column})
    if config.realign_data:
        check_source(config.realign_data, "realign_data", columns={"realign_caption_column": config.realign_caption_column})
    if not config.check_only:
        for key in ("out", "realign_out"):
            path = getattr(config, key)
            if path and Path(path).exists() and not config.overwrite:
                raise UsageError(f"{key}={path!r} already exists; pass --overwrite to replace it or choose another {key}")
            if path:
                check_writable(path, key)


def transfer(config: TransferConfig) -> int:
    from adpo.lvlm import LlavaView
    from adpo.models import load_lvlm
    from adpo.tower import VisionTower
    from transfer.geometry import GraftOptions
    from transfer.graft import check_donor, graft_encoder, grafted_summary, load_donor, save_grafted
    from transfer.realign import RealignConfig, realign_projector
    from transfer.verify import (answer_agreement, donor_view, feature_shift, generate_answers, load_samples,
                                 robust_vqa_accuracy, tower_agreement)

    out = Path(config.out)
    # the donor first: an open_clip file without its activation is refused before the target loads
    donor = load_donor(config.encoder, activation=config.activation, num_attention_heads=config.num_attention_heads,
                       image_mean=config.donor_image_mean, image_std=config.donor_image_std)
    model, processor = load_lvlm(config.target, dtype=config.dtype)
    if config.device:
        model = model.to(config.device)
    options = GraftOptions(config.interpolate_positions, config.fold_normalisation, config.adopt_donor_activation,
                           config.adopt_donor_layer_norm_eps)
    geometry = check_donor(model, processor, donor, options)
    for check in geometry.checks:
        print(f"[{check.status:>8}] {check.name}: donor {check.donor} | target {check.target}"
              + (f"\n           {check.message}" if check.message else ""))
    if config.check_only:
        return 0 if geometry.ok else 1
    geometry.raise_if_incompatible()

    robust = dict(eps=config.robust_eps, steps=config.robust_steps, norm=config.robust_norm,
                  max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=config.seed,
                  pad_to_square=config.pad_to_square)
    samples = load_samples(config.verify_data, config.verify_samples, question_column=config.question_column,
                           answers_column=config.answers_column, question_suffix=config.question_suffix) if config.verify_data else []
    images = [s.image for s in samples]
    shift = dict(eps=config.feature_shift_eps, steps=config.feature_shift_steps, norm=config.robust_norm,
                 batch_size=config.batch_size, seed=config.seed, pad_to_square=config.pad_to_square)
    # taken on the target before the graft and on the grafted model after it; reported as original_* / grafted_*
    measures = []
    if config.feature_shift_eps:
        measures.append(lambda: feature_shift(model, processor, images, **shift))
    if config.robust_eps:
        measures.append(lambda: robust_vqa_accuracy(model, processor, samples, **robust))
    original_answers, before = [], []
    if samples:
        original_answers = generate_answers(model, processor, samples, config.max_new_tokens, config.batch_size, "original answers",
                                            pad_to_square=config.pad_to_square)
        before = [measure() for measure in measures]

    outcome = graft_encoder(model, processor, donor, options)
    report = grafted_summary(outcome, donor, config.target, out)

    def verification() -> dict:
        grafted = generate_answers(model, processor, samples, config.max_new_tokens, config.batch_size, "grafted answers",
                                   pad_to_square=config.pad_to_square)
        section = answer_agreement(original_answers, grafted, samples)
        for measure, original in zip(measures, before):
            section |= {f"original_{k}": v for k, v in original.items()} | {f"grafted_{k}": v for k, v in measure().items()}
        return section

    if samples:
        target_tower = VisionTower.from_lvlm(model, processor)
        donor_tower, donor_processor = donor_view(donor.encoder.to(LlavaView(model, processor).device), donor.image_mean,
                                                  donor.image_std, donor.image_processor, target_tower, processor)
        report["verification"] = tower_agreement(donor_tower, target_tower, images, donor_processor, processor,
                                                 config.batch_size, pad_to_square=config.pad_to_square) | verification()
    save_grafted(model, processor, out, report, overwrite=config.overwrite)
    print(f"grafted model written to {out} (report: {out / 'graft_report.md'})")
    _print_numbers(report.get("verification"))

    if config.realign_out:
        captions = load_samples(config.realign_data, config.realign_samples, config.realign_caption_column)
        training = realign_projector(model, processor, captions, RealignConfig(
            config.realign_steps, config.realign_learning_rate, config.realign_batch_size, seed=config.seed,
            pad_to_square=config.pad_to_square))
        report["realignment"] = training | (verification() if samples else {})
        report["out_dir"] = config.realign_out
        save_grafted(model, processor, config.realign_out, report, overwrite=config.overwrite)
        print(f"projector-re-aligned model written to {config.realign_out}")
        _print_numbers(report["realignment"])
    return 0


def _print_numbers(section: dict | None) -> None:
    if section:
        print(json.dumps({k: v for k, v in section.items() if isinstance(v, (int, float, str))}, indent=1))


def convert(config: ConvertConfig) -> int:
    from transformers import CLIPImageProcessor

    from adpo.io import check_writable
    from adpo.encoder_io import load_encoder, save_encoder
    from adpo.openclip import clip_vision_model_to_openclip, load_state_dict_file, openclip_to_clip_vision_model, save_state_dict_file

    if bool(config.from_open_clip) == bool(config.to_open_clip):
        raise UsageError("pass exactly one of --from-open-clip FILE or --to-open-clip DIR")
    given = config.from_open_clip or config.to_open_clip
    if not Path(given).exists():
        raise UsageError(f"{given!r} does not exist; pass the open_clip file or encoder directory to convert")
    check_writable(config.out, "out")
    if config.to_open_clip:
        state = clip_vision_model_to_openclip(load_encoder(config.to_open_clip))
        print(f"wrote {save_state_dict_file(state, config.out)} ({len(state)} tensors, open_clip visual layout)")
        return 0
    if config.activation is None:
        raise UsageError("--activation is required: quick_gelu (OpenAI CLIP, FARE, TeCoA) or gelu (LAION open_clip)")
    conversion = openclip_to_clip_vision_model(load_state_dict_file(config.from_open_clip), hidden_act=config.activation,
                                               num_attention_heads=config.num_attention_heads)
    mean, std = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) if config.openai_normalisation else (config.image_mean, config.image_std)
    processor = None
    if mean is not None and std is not None:
        size = conversion.config.image_size
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_mean=mean, image_std=std)
    card = {"converted_from": config.from_open_clip, "format": "open_clip visual state dict", "activation": config.activation,
            "unused_keys": conversion.unused, "assumptions": conversion.assumptions,
            "normalisation": "unknown (pass --image-mean/--image-std)" if processor is None else {"mean": mean, "std": std}}
    save_encoder(conversion.model, config.out, processor, card)
    print(f"wrote encoder directory {config.out}: {conversion.config.num_hidden_layers} layers, hidden "
          f"{conversion.config.hidden_size}, {conversion.config.image_size} px; unused keys: {sorted(conversion.unused)}")
    for note in conversion.assumptions:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
