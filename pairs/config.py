"""The configuration of a pair-generation run, loadable from YAML (``--config``) and the command line.

Everything is checked in :meth:`PairsConfig.validate` before any model is loaded, so a typo fails in
a second instead of after minutes of model loading; a bad value raises :class:`adpo.errors.UsageError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adpo.errors import UsageError
from adpo.io import check_writable
from adpo.plugins import model_plugin, plugin_data_hint, plugin_default_data, plugin_model_hint
from adpo.prompts import resolve_prompts
from adpo.sources import ImageSourceArguments, check_source
from adpo.threat import ThreatArguments, ThreatModel

EMBEDDINGS = ("pooled", "llm")
DTYPES = ("auto", "float32", "bfloat16", "float16")

#: fields that leave the shards unchanged (keep_unchanged acts at merge; allow_outside_root only lets a run start):
#: a resumed run may change them
NON_CONTENT_FIELDS = frozenset(
    {"output_dir", "push_to_hub", "hub_repo_id", "hub_private", "progress", "device_map", "keep_unchanged",
     "allow_outside_root"}
)


@dataclass
class PairsConfig(ThreatArguments, ImageSourceArguments):
    # --- model
    model_name_or_path: str = field(
        default="", metadata={"help": f"LLaVA-family model: hub id or local directory{plugin_model_hint('lvlm')}."}
    )
    dtype: str = field(default="auto", metadata={"help": f"Model dtype, one of {DTYPES}."})
    device_map: str | None = field(default=None, metadata={"help": "Passed to load_lvlm; default: this process's device."})
    quantization: str | None = field(default=None, metadata={"help": "Passed to load_lvlm ('4bit' / '8bit')."})

    # --- images (adpo.sources.open_source)
    source: str = field(
        default="",
        metadata={"help": "Image source: an image folder, a saved HF dataset directory, a COCO captions .json, a hub "
                          f"dataset id{plugin_data_hint()}; default for a plugin's model: the plugin's data."},
    )
    source_split: str = field(default="train", metadata={"help": "Split of a HF dataset or of a plugin's data."})
    id_column: str | None = field(default=None, metadata={"help": "HF dataset: column with a stable id (default: row index)."})
    pad_to_square: bool = field(
        default=False,
        metadata={"help": "Pad each image to a square in the processor's mean colour before resizing, as original LLaVA-1.5 "
                          "does (llava-hf's processor centre-crops). The stored images are square, so training sees the same."},
    )

    # --- prompts
    prompt_set: str = field(default="paper", metadata={"help": "Named prompt set (adpo.prompts.PROMPT_SETS)."})
    prompts: list[str] | None = field(default=None, metadata={"help": "Explicit prompts (override prompt_set)."})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file, one prompt per line (overrides prompt_set)."})
    prompts_per_image: int = field(default=1, metadata={"help": "Distinct prompts sampled per image with the seed."})

    # --- attack (FARE objective against the original tower): attack_norm, attack_eps, attack_steps, attack_step_size,
    # attack_random_start, attack_momentum from ThreatArguments; attack_eps unset: the model's plugin radius (the world's
    # working ε for its models), else 2/255 (the paper)
    embedding: str = field(
        default="pooled",
        metadata={"help": "Tower output the FARE objective compares: 'pooled' (CLS embedding, as FARE) or 'llm' "
                          "(the patch features the LLM consumes)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds prompt choice and PGD random starts."})

    # --- decoding
    max_new_tokens: int = field(default=32, metadata={"help": "Answer length limit (tokens)."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy decoding."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (do_sample only)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling (do_sample only)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width."})

    # --- output
    output_dir: str = field(default="", metadata={"help": "Run directory: shards/, dataset/, README.md, summary.json."})
    batch_size: int = field(default=8, metadata={"help": "Images per attack batch (their prompts are generated together)."})
    images_per_shard: int = field(default=64, metadata={"help": "Images per shard (the unit of resume and of work split)."})
    keep_unchanged: bool = field(default=True, metadata={"help": "Keep pairs whose rejected answer equals the chosen one."})
    compute_ref_logps: bool = field(
        default=False, metadata={"help": "Store ref_chosen_logps / ref_rejected_logps under the original model."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push the merged dataset to the hub (needs hub_repo_id)."})
    hub_repo_id: str | None = field(default=None, metadata={"help": "Hub dataset repo for push_to_hub."})
    hub_private: bool = field(default=True, metadata={"help": "Create the hub repo private."})
    progress: bool = field(default=True, metadata={"help": "Show a tqdm bar (pairs/s) on the main process."})

    def validate(self) -> None:
        """Check every key; raise UsageError naming the key, the value and the fix. Touches no model."""
        if not self.model_name_or_path:
            raise UsageError(f"model_name_or_path is required: a hub id or a local directory{plugin_model_hint('lvlm')}")
        if self.model_name_or_path.startswith((".", "/", "~")) and not Path(self.model_name_or_path).expanduser().is_dir():
            raise UsageError(f"model_name_or_path {self.model_name_or_path!r} looks like a path but is not a directory")
        if self.dtype not in DTYPES:
            raise UsageError(f"dtype={self.dtype!r}; use one of {DTYPES}")
        if not self.output_dir:
            raise UsageError("output_dir is required")
        check_writable(self.output_dir, "output_dir")

        if not self.resolved_source():
            raise UsageError(f"source is required: an image folder, a saved HF dataset, a COCO .json or a hub id{plugin_data_hint()}")
        check_source(self.resolved_source(), "source", self.source_split, split_key="source_split",
                     columns={"image_column": self.image_column, "id_column": self.id_column})
        if problems := self.image_source_problems():
            raise UsageError(problems[0])

        prompts = self.prompt_list()
        if self.prompts_per_image < 1 or self.prompts_per_image > len(prompts):
            raise UsageError(f"prompts_per_image={self.prompts_per_image}; must be in 1..{len(prompts)} (prompts available)")

        self.check_threat()
        if self.embedding not in EMBEDDINGS:
            raise UsageError(f"embedding={self.embedding!r}; use one of {EMBEDDINGS}")

        if self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
        if self.num_beams < 1:
            raise UsageError(f"num_beams={self.num_beams}; must be >= 1")
        if self.do_sample and (self.temperature <= 0 or not 0 < self.top_p <= 1):
            raise UsageError(f"do_sample needs temperature > 0 and 0 < top_p <= 1, got {self.temperature} and {self.top_p}")
        if self.batch_size < 1 or self.images_per_shard < 1:
            raise UsageError(f"batch_size={self.batch_size} and images_per_shard={self.images_per_shard} must be >= 1")
        if self.push_to_hub and not self.hub_repo_id:
            raise UsageError("push_to_hub needs hub_repo_id (e.g. 'me/adpo-pairs')")

    def resolved_source(self) -> str:
        """The source spec; a plugin's models default to the plugin's data (the world's models: the world's images)."""
        return self.source or plugin_default_data(self.model_name_or_path) or ""

    def prompt_list(self) -> list[str]:
        return resolve_prompts(self.prompt_set, self.prompts, self.prompts_file)

    def threat(self) -> ThreatModel:
        """The attack's ball: ``attack_eps``, else a plugin's radius for its models (the world's working ε), else
        2/255 (the paper)."""
        named = model_plugin(self.model_name_or_path)
        default = float(named[0].radius()) if named is not None and named[0].radius is not None else 2 / 255
        return self.threat_model(default)

    def decoding(self) -> dict:
        """generate() keyword arguments; stored with every pair."""
        settings = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:
            settings.update(temperature=self.temperature, top_p=self.top_p)
        return settings

    def content_fingerprint(self) -> dict:
        """What decides the dataset's content: the content fields and the weights behind the model name (a
        rebuilt local model or world keeps its name); a resume must match exactly."""
        from adpo.models import model_identity

        fields = {k: v for k, v in asdict(self).items() if k not in NON_CONTENT_FIELDS}
        return fields | {"model_weights": model_identity(self.model_name_or_path)}

    def fingerprint_hash(self, content: dict | None = None) -> str:
        """Short hash of ``content`` (default: :meth:`content_fingerprint`, pass it when already computed)."""
        blob = json.dumps(self.content_fingerprint() if content is None else content, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
