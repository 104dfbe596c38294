"""The configuration of one ``adpo eval`` run (a dataclass, loadable from YAML with ``--config``).

Every value is checked when the config is built, before any model loads; a bad one raises
:class:`adpo.errors.UsageError`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from adpo.errors import UsageError
from adpo.io import check_writable
from adpo.plugins import plugin_radius_hint
from adpo.sources import ALLOW_OUTSIDE_ROOT_HELP, check_source
from adpo.threat import EPS_SYNTAX, NORMS, parse_radius

TASKS = ("vqa", "caption", "targeted", "zeroshot")
PRECISIONS = ("half", "float16", "bfloat16", "float32")


@dataclass
class EvalConfig:
    """What to evaluate, against which attack, on which samples.

    Epsilons are written as every adpo config writes them (:data:`adpo.threat.EPS_SYNTAX`), a plugin's named radius
    included (the bundled world's working epsilon).
    """

    # -- model
    model: str = field(default="", metadata={"help": "LVLM (required for vqa, caption and targeted): hub id, save_pretrained dir, "
                                                   "or a plugin's LVLM name (the bundled world's small or large)."})
    encoder: str | None = field(default=None, metadata={"help": "CLIPVisionModel dir to put into the model's vision tower first (FARE/TeCoA/AdPO encoders)."})
    clip_model: str | None = field(default=None, metadata={"help": "zeroshot: CLIPModel (text tower + projections) for the class prompts, or a plugin's CLIP name."})
    name: str | None = field(default=None, metadata={"help": "Row label in tables and plots (default: the model name)."})
    dtype: str = field(default="float32", metadata={"help": "Model weights dtype: float32 | bfloat16 | float16."})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N."})

    # -- task and data
    task: str = field(default="vqa", metadata={"help": "vqa | caption | targeted | zeroshot."})
    data: str = field(default="", metadata={"help": "Required: a datasets.save_to_disk dir, an image folder, a COCO .json, a "
                                                 "hub dataset id, or a plugin's data (<scheme>:<split>, e.g. the bundled world's)."})
    split: str = field(default="test", metadata={"help": "Split for hub datasets."})
    image_root: str | None = field(default=None, metadata={"help": "COCO .json data: the folder holding the image files "
                                                                   "(e.g. val2014/ beside annotations/); default: the json's folder."})
    allow_outside_root: bool = field(default=False, metadata={"help": ALLOW_OUTSIDE_ROOT_HELP})
    num_samples: int = field(default=64, metadata={"help": "Number of evaluated samples (VQA: questions)."})
    questions_per_image: int = field(default=1, metadata={"help": "VQA on datasets with several questions per image."})
    image_column: str = field(default="image", metadata={"help": "HF datasets: the image column."})
    question_column: str = field(default="question", metadata={"help": "HF datasets, VQA task: the question column (one question per row)."})
    answers_column: str = field(default="answers", metadata={"help": "HF datasets, VQA task: the reference answers (a list, VQAv2 dicts, or one string)."})
    captions_column: str = field(default="captions", metadata={"help": "HF datasets, caption task: the reference captions column."})
    label_column: str = field(default="label", metadata={"help": "HF datasets, zeroshot task: the class label column."})
    prompt: str | None = field(default=None, metadata={"help": "caption/targeted prompt (default per task)."})
    question_suffix: str = field(default="", metadata={"help": "VQA: appended to each question, e.g. ' Answer with a single word.'"})
    class_prompt: str = field(default="a photo of a {}", metadata={"help": "zeroshot: text prompt per class name."})
    max_new_tokens: int = field(default=0, metadata={"help": "Generation length; 0 = per-task default (VQA 10, caption 30, targeted 30)."})
    pad_to_square: bool = field(default=False, metadata={"help": "Pad each image to a square in the processor's mean colour "
                                                                 "before resizing, as original LLaVA-1.5 does (llava-hf's processor centre-crops)."})

    # -- threat model and attack
    # the keys of adpo.threat.ThreatArguments, with a list of radii: the evaluation sweeps them
    attack_eps: list[str] = field(default_factory=lambda: ["2/255", "4/255"], metadata={"help": f"Epsilons in [0,1] pixels, each {EPS_SYNTAX}{plugin_radius_hint()}."})
    attack_norm: str = field(default="linf", metadata={"help": "linf | l2."})
    attack_steps: int = field(default=100, metadata={"help": "APGD steps per attack pass."})
    precision_schedule: list[str] = field(
        default_factory=lambda: ["half", "float32"],
        metadata={"help": "Stages, each running every attack pass on the still-unbroken samples; later stages warm-start "
                          "from the worst perturbation so far. half = fp16 autocast on GPU, "
                          "float32 on CPU (bf16 autocast was slower there; ask for bfloat16 explicitly)."},
    )
    vqa_targets: list[str] = field(default_factory=lambda: ["Maybe", "Word"], metadata={"help": "VQA: extra targeted passes."})
    target: str = field(default="https://tinyurl.com/adpo-target", metadata={"help": "targeted: the string the attack tries to make the model output."})
    caption_break_threshold: float = field(default=0.1, metadata={"help": "caption: a sample with CIDEr below this (pycocoevalcap units; 0.1 = 10 in papers) is broken and no longer attacked."})
    zeroshot_target_classes: int = field(default=3, metadata={"help": "zeroshot: targeted APGD toward the top-k wrong classes."})
    attack_modalities: list[str] = field(default_factory=lambda: ["image"], metadata={"help": "zeroshot: any of image (the APGD ensemble), "
                                                                                      "text (the class prompt, k substitutions), joint (image then text), side by side."})
    text_max_substitutions: int = field(default=1, metadata={"help": "Text and joint attacks: at most this many token substitutions (k)."})
    text_candidates: str = field(default="words", metadata={"help": "Text attack substitutes: words (alphabetic vocabulary entries) | vocabulary."})
    text_shortlist: int = field(default=16, metadata={"help": "Text attack: substitutions per text and round scored exactly after HotFlip's ranking."})
    text_beam_width: int = field(default=1, metadata={"help": "Text attack: texts kept per round (1 = greedy)."})
    step_check_steps: int = field(default=10, metadata={"help": "Re-run the largest epsilon with this many steps to check that more steps never help the model (0 = skip)."})

    # -- execution and output
    batch_size: int = field(default=16, metadata={"help": "Rows attacked together: one per sample and early-stopping pass, "
                                                          "a sample's passes side by side (per-sample early stop inside)."})
    seed: int = 0
    num_examples: int = field(default=4, metadata={"help": "Example panels (clean vs adversarial) in the report."})
    output_dir: str = field(default="runs/eval", metadata={"help": "Where report.json, report.md and the plots go."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars (only on a TTY)."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UsageError(f"task={self.task!r} is not one of {TASKS}; set `task:` in the eval config.")
        unknown = [p for p in self.precision_schedule if p not in PRECISIONS]
        if unknown or not self.precision_schedule:
            raise UsageError(f"precision_schedule={self.precision_schedule} must be a non-empty list of {PRECISIONS}.")
        if self.attack_norm not in NORMS:
            raise UsageError(f"attack_norm={self.attack_norm!r}; use one of {NORMS}")
        if self.attack_steps < 1:
            raise UsageError(f"attack_steps={self.attack_steps} must be >= 1.")
        for key in ("step_check_steps", "num_examples", "max_new_tokens", "zeroshot_target_classes"):
            if getattr(self, key) < 0:
                raise UsageError(f"{key}={getattr(self, key)} must be >= 0.")
        if self.batch_size < 1 or self.num_samples < 1 or self.questions_per_image < 1:
            raise UsageError(f"batch_size ({self.batch_size}), num_samples ({self.num_samples}) and questions_per_image "
                             f"({self.questions_per_image}) must be >= 1.")
        check_attack_modalities(self)
        if not self.attack_eps:
            raise UsageError("attack_eps must list at least one epsilon, e.g. attack_eps: ['2/255', '4/255'].")
        self.attack_eps = [str(e) for e in self.attack_eps]
        for eps in self.attack_eps:
            parse_radius(eps, "attack_eps", self.attack_norm)
        for key in ("model", "encoder"):
            value = getattr(self, key)
            if value and value.startswith((".", "/", "~")) and not Path(value).expanduser().exists():
                raise UsageError(f"{key}={value!r} looks like a path but does not exist; pass an existing directory")
        columns = {"image_column": self.image_column}
        columns.update({"vqa": {"question_column": self.question_column, "answers_column": self.answers_column},
                        "caption": {"captions_column": self.captions_column},
                        "zeroshot": {"label_column": self.label_column}}.get(self.task, {}))
        if self.data:  # required by the evaluation itself (load_samples); a caller may pass its own samples
            check_source(self.data, "data", self.split, columns)
        if self.image_root is not None and not Path(self.image_root).expanduser().is_dir():
            raise UsageError(f"image_root={self.image_root!r} is not a directory; set it to the folder of the image files "
                             "(for COCO, e.g. data/coco/val2014).")
        check_writable(self.output_dir, "output_dir")

    def to_dict(self) -> dict:
        return asdict(self)


def check_attack_modalities(config: EvalConfig) -> None:
    """``attack_modalities`` and the text threat model's settings; text and joint attacks are zero-shot only."""
    from adpo.eval.multimodal import MODALITIES
    from adpo.text_attacks import check_text_threat_settings

    unknown = [m for m in config.attack_modalities if m not in MODALITIES]
    if unknown or "image" not in config.attack_modalities:
        raise UsageError(f"attack_modalities={config.attack_modalities} must list image and any of text, joint "
                         f"(choices {MODALITIES}); the image attacks always run")
    if config.task != "zeroshot" and config.attack_modalities != ["image"]:
        raise UsageError(f"attack_modalities={config.attack_modalities}: text and joint attacks attack a class prompt, "
                         "so they need task: zeroshot")
    check_text_threat_settings(config)
