"""Generate clean-chosen / adversarial-rejected preference pairs with an LLaVA-family model.

For a batch of images (each with its seeded prompts):

1. x_adv = PGD on the FARE objective ‖φ(x') − φ_orig(x)‖² (``adpo.attacks.pgd`` +
   ``adpo.objectives.EmbeddingDistance``). The model is never modified here, so its own tower *is* the
   original tower φ_orig. The attack depends on the image only, so it runs once per image, not per prompt;
2. x_adv is put on the uint8 grid (what the PNG stores) without leaving the ε-ball, and every later
   number (y_l, the achieved distance, the reference log-probs) is computed on that stored image;
3. y_w and y_l = the model's answers on the clean images and on x_adv, in one batched ``LlavaView.generate``
   call; optionally the reference log-probs log π(y_w|x,q) and
   log π(y_l|x_adv,q) (``LlavaView.answer_scores``, sums over the answer tokens as the AdPO trainer uses them).

:func:`run` drives a whole run: plan, shards, resume, split across accelerate processes, merge, card.
"""

from __future__ import annotations

import io
import json
import time
from datetime import timedelta
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from adpo.attacks import pgd
from adpo.io import write_json_atomic, write_text_atomic
from adpo.lvlm import LlavaView
from adpo.models import load_lvlm
from adpo.objectives import EmbeddingDistance
from adpo.pairs_format import DATASET_DIR, features_for
from adpo.preprocess import ImageLoadError, to_pixels, to_uint8_images
from adpo.runtime import derived_seed, write_stage_outputs

import pairs.shards as shard_files  # write_shard looked up at call time (tests simulate a crash through it)
from pairs.card import build_summary, render_card
from pairs.config import PairsConfig
from pairs.images import RunImages, open_image_source
from pairs.shards import (
    ShardPlan,
    WorkItem,
    check_or_write_manifest,
    merge_shards,
    plan_digest,
    plan_shards,
    read_shard_record,
    remove_stale_temporaries,
    shard_columns,
    shard_is_done,
    shards_for_process,
)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the uint8 pixels come back exactly
    return buffer.getvalue()


@dataclass
class PairBatchResult:
    chosen: list[str]
    rejected: list[str]
    clean_pixels: torch.Tensor  # [n_images, 3, H, W] on the k/255 grid
    adv_pixels: torch.Tensor  # [n_images, 3, H, W] on the k/255 grid, inside the ball
    embedding_distance: torch.Tensor  # [n_images]
    ref_chosen_logps: list[float] | None = None
    ref_rejected_logps: list[float] | None = None


class PairGenerator:
    """Batched pair generation for one loaded model. ``pixels`` are [N, 3, H, W] in [0, 1] from ``to_pixels``."""

    def __init__(self, model, processor, config: PairsConfig):
        self.view = LlavaView(model, processor)
        self.tower = self.view.tower
        self.config = config
        self.threat = config.threat()
        self.decoding = config.decoding()

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.tower.embed(pixels, self.config.embedding)

    def _generate(self, pixels: torch.Tensor, prompts: Sequence[str], sample_seed: int) -> list[str]:
        settings = dict(self.decoding)
        max_new_tokens = settings.pop("max_new_tokens")
        if settings.get("do_sample"):
            torch.manual_seed(sample_seed)  # sampling draws from the global generator
        return self.view.generate(pixels, list(prompts), max_new_tokens=max_new_tokens, **settings)

    def attack(self, pixels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored-grid adversarial images and their achieved embedding distance to the clean images."""
        with torch.no_grad():
            reference = self._embed(pixels)
        objective = EmbeddingDistance(self._embed, reference, modules=(self.tower,))
        generator = torch.Generator(device=pixels.device).manual_seed(seed)
        result = pgd(objective, pixels, self.threat, self.config.attack_steps, momentum=self.config.attack_momentum,
                     generator=generator)
        adv = self.threat.quantize(result.x_adv, pixels)
        with torch.no_grad():
            distance = objective(adv).float()
        return adv, distance

    def run_batch(self, pixels: torch.Tensor, image_of_item: Sequence[int], prompts: Sequence[str], seed: int) -> PairBatchResult:
        """Pairs for ``prompts[j]`` about image ``image_of_item[j]`` of ``pixels``; ``seed`` fixes the random start.

        The attack does not depend on the answers, so it runs first and the clean and adversarial answers
        come from one generate call over both halves (half the calls, twice the batch).
        """
        pixels = pixels.to(self.view.device, torch.float32)
        index = torch.as_tensor(list(image_of_item), device=pixels.device)
        adv, distance = self.attack(pixels, derived_seed(seed, "attack"))
        answers = self._generate(torch.cat([pixels[index], adv[index]]), list(prompts) * 2, derived_seed(seed, "answers"))
        chosen, rejected = answers[: len(prompts)], answers[len(prompts):]
        result = PairBatchResult(chosen, rejected, pixels, adv, distance)
        if self.config.compute_ref_logps:
            logps = self.answer_logps(torch.cat([pixels[index], adv[index]]), list(prompts) * 2, chosen + rejected)
            result.ref_chosen_logps, result.ref_rejected_logps = logps[: len(prompts)], logps[len(prompts):]
        return result

    @torch.no_grad()
    def answer_logps(self, pixels: torch.Tensor, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Σ over answer tokens of log π(answer | image, prompt), answers encoded as ``LlavaView.encode`` does."""
        encoded = self.view.encode(list(prompts), list(answers))
        scores = self.view.answer_scores(pixels, encoded.input_ids, encoded.attention_mask, encoded.labels)
        return [float(v) for v in scores.sum_logps]


def rows_for_shard(
    generator: PairGenerator,
    shard: ShardPlan,
    images: dict[str, torch.Tensor],
    config: PairsConfig,
    model_id: str,
    progress: tqdm | None = None,
) -> list[dict]:
    """The dataset rows of one shard. ``images`` maps source_id -> [3, H, W] pixels for the readable images."""
    items_by_image: dict[str, list[WorkItem]] = {}
    for item in shard.items:
        if item.source_id in images:
            items_by_image.setdefault(item.source_id, []).append(item)
    image_ids = list(items_by_image)
    decoding = json.dumps(config.decoding(), sort_keys=True)
    rows: list[dict] = []
    for batch_number, start in enumerate(range(0, len(image_ids), config.batch_size)):
        batch_ids = image_ids[start : start + config.batch_size]
        pixels = torch.stack([images[i] for i in batch_ids])
        batch_items = [item for i in batch_ids for item in items_by_image[i]]
        image_of_item = [batch_ids.index(item.source_id) for item in batch_items]
        seed = derived_seed(config.seed, shard.shard_index, batch_number)
        result = generator.run_batch(pixels, image_of_item, [item.prompt for item in batch_items], seed)
        clean_png = [png_bytes(im) for im in to_uint8_images(result.clean_pixels)]
        adv_png = [png_bytes(im) for im in to_uint8_images(result.adv_pixels)]
        for j, item in enumerate(batch_items):
            k = image_of_item[j]
            row = {
                "image": {"bytes": clean_png[k], "path": None},
                "adv_image": {"bytes": adv_png[k], "path": None},
                "prompt": item.prompt,
                "chosen": result.chosen[j],
                "rejected": result.rejected[j],
                "answers_differ": result.chosen[j] != result.rejected[j],
                "source_id": item.source_id,
                "item_index": item.item_index,
                "prompt_index": item.prompt_index,
                "norm": generator.threat.norm,
                "eps": generator.threat.eps,
                "steps": config.attack_steps,
                "step_size": generator.threat.alpha,
                "random_start": generator.threat.random_start,
                "embedding": config.embedding,
                "embedding_distance": float(result.embedding_distance[k]),
                "seed": config.seed,
                "model_id": model_id,
                "decoding": decoding,
            }
            if result.ref_chosen_logps is not None:
                row["ref_chosen_logps"] = result.ref_chosen_logps[j]
                row["ref_rejected_logps"] = result.ref_rejected_logps[j]
            rows.append(row)
        if progress is not None:
            progress.update(len(batch_items))
    return rows


# --------------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------------


def _load_model(config: PairsConfig, device: torch.device):
    device_map = config.device_map
    if device_map is None and device.type != "cpu":
        device_map = str(device)  # each accelerate process loads straight onto its own device
    dtype = None if config.dtype == "auto" else config.dtype
    model, processor = load_lvlm(config.model_name_or_path, dtype=dtype, device_map=device_map, quantization=config.quantization)
    return model.eval(), processor


def _shard_images(source: RunImages, shard: ShardPlan, processor, pad_to_square: bool) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Pixels of the shard's readable images (processor resize/crop, [0,1]) and the skipped ones with reasons."""
    images: dict[str, torch.Tensor] = {}
    skipped: list[dict] = []
    for source_id, image_or_error in source.load(shard.image_positions):
        if isinstance(image_or_error, str):
            skipped.append({"source_id": source_id, "reason": image_or_error})
            continue
        try:
            images[source_id] = to_pixels([image_or_error], processor, pad_to_square=pad_to_square)[0]
        except ImageLoadError as error:
            skipped.append({"source_id": source_id, "reason": error.reason})
    return images, skipped


def _cpu_only() -> bool:
    """accelerate only sets up gloo across CPU processes when told the run is CPU-only."""
    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def run(config: PairsConfig) -> dict:
    """Generate (or resume) the run described by ``config``; returns the summary (on every process)."""
    config.validate()
    eps = config.threat().eps
    prompts = config.prompt_list()
    # A process whose shards are all finished (e.g. on resume) waits at the final barrier for the others:
    # the default 30-minute collective timeout would kill long runs, hence the long one.
    state = PartialState(cpu=_cpu_only(), timeout=timedelta(hours=72))
    output_dir = Path(config.output_dir).expanduser()

    source = open_image_source(config)
    shards = plan_shards(source.source_ids, prompts, config.prompts_per_image, config.seed, config.images_per_shard)
    items_planned = sum(len(s.items) for s in shards)
    content = config.content_fingerprint()
    manifest = {
        "fingerprint": config.fingerprint_hash(content),
        "plan_digest": plan_digest(source.source_ids),
        "eps": eps,
        "num_images": len(source.source_ids),
        "num_shards": len(shards),
        "num_items": items_planned,
        "config": content,
    }
    if state.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(output_dir)
        check_or_write_manifest(output_dir, manifest, write=True)
    state.wait_for_everyone()
    if not state.is_main_process:
        check_or_write_manifest(output_dir, manifest, write=False)

    todo = [s for s in shards_for_process(shards, state.process_index, state.num_processes) if not shard_is_done(output_dir, s.shard_index)]
    if todo:
        model, processor = _load_model(config, state.device)
        generator = PairGenerator(model, processor, config)
        features = features_for(config.compute_ref_logps)
        bar = tqdm(
            total=sum(len(s.items) for s in todo), unit="pair", desc=f"pairs [process {state.process_index}]",
            disable=not config.progress or not state.is_local_main_process, dynamic_ncols=True,
        )
        with bar:
            for shard in todo:
                started = time.perf_counter()
                images, skipped = _shard_images(source, shard, processor, config.pad_to_square)
                bar.update(sum(1 for item in shard.items if item.source_id not in images))
                rows = rows_for_shard(generator, shard, images, config, config.model_name_or_path, bar)
                record = {"skipped": skipped, "num_items": len(shard.items), "seconds": time.perf_counter() - started,
                          "process_index": state.process_index}
                shard_files.write_shard(output_dir, shard.shard_index, rows, features, record)
    state.wait_for_everyone()

    summary_path = output_dir / "summary.json"
    if state.is_main_process:
        features = features_for(config.compute_ref_logps)
        kept = merge_shards(output_dir, len(shards), features, keep_unchanged=config.keep_unchanged)
        every_pair = shard_columns(output_dir, len(shards), ["answers_differ", "embedding_distance", "chosen", "rejected"])
        summary = build_summary(
            config=asdict(config),
            eps=eps,
            step_size=config.threat().alpha,
            model_id=config.model_name_or_path,
            prompts=prompts,
            images_planned=len(source.source_ids) + len(source.skipped),
            items_planned=items_planned,
            source_skipped=source.skipped,
            shard_records=[read_shard_record(output_dir, i) for i in range(len(shards))],
            answers_differ=every_pair["answers_differ"],
            distances=every_pair["embedding_distance"],
            empty_chosen=sum(not answer for answer in every_pair["chosen"]),
            empty_rejected=sum(not answer for answer in every_pair["rejected"]),
            pairs_in_dataset=len(kept),
            num_processes=state.num_processes,
            fingerprint=manifest["fingerprint"],
        )
        write_json_atomic(summary_path, summary)
        card = render_card(summary)
        write_text_atomic(output_dir / "README.md", card)
        write_stage_outputs(output_dir, dataset=output_dir / DATASET_DIR, summary=summary_path)
        if config.push_to_hub:
            kept.push_to_hub(config.hub_repo_id, private=config.hub_private)
            from huggingface_hub import DatasetCard

            DatasetCard(card).push_to_hub(config.hub_repo_id, repo_type="dataset")
    state.wait_for_everyone()
    return json.loads(summary_path.read_text(encoding="utf-8"))
