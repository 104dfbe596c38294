"""Work plan, shard files and the final merge: what makes a run resumable and splittable.

* **Plan.** The source's images, in source order (first ``max_images``), are cut into shards of
  ``images_per_shard`` images; every image carries its seeded prompts, so the work items are fixed by
  the config alone. Process ``i`` of ``n`` takes shards ``i, i+n, i+2n, …``: shards are global, so a
  resumed run may use a different number of processes and still produce the same shards.
* **Shard files.** ``shards/shard-00007.parquet`` holds the pairs of shard 7 (HF features in the
  schema metadata, so images stay ``Image``); ``shards/shard-00007.json`` is written *after* it and
  marks the shard finished (skipped images, counts, timing). Both are written to a temporary name and
  renamed (``adpo.io``), so a kill -9 leaves either a finished shard or nothing that counts: an unfinished
  shard is simply done again.
* **Run manifest.** ``run.json`` records the config fingerprint and the plan; a resume with a config
  that would change the content is refused instead of mixing two datasets.
* **Merge.** The finished shards, in shard order, become one ``datasets.Dataset`` in the pairs format
  (:mod:`adpo.pairs_format`) saved with ``save_to_disk`` under ``dataset/`` (atomically replaced), optionally
  without unchanged pairs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
from datasets import Features

from adpo.io import atomic_directory, atomic_file, write_json_atomic
from adpo.pairs_format import DATASET_DIR, RUN_MANIFEST, stamp
from adpo.prompts import prompts_for_image

SHARD_DIR = "shards"


@dataclass(frozen=True)
class WorkItem:
    item_index: int
    source_id: str
    prompt_index: int
    prompt: str


@dataclass(frozen=True)
class ShardPlan:
    shard_index: int
    image_positions: tuple[int, ...]  # positions in the source's image order
    items: tuple[WorkItem, ...]


def plan_shards(
    source_ids: list[str], prompts: list[str], prompts_per_image: int, seed: int, images_per_shard: int
) -> list[ShardPlan]:
    """Cut the image list into shards and attach each image's seeded prompts (image-major item order)."""
    if len(set(source_ids)) != len(source_ids):
        seen: set[str] = set()
        duplicate = next(s for s in source_ids if s in seen or seen.add(s))
        raise ValueError(f"the image source yields source_id {duplicate!r} twice; source ids must be unique")
    shards = []
    item_index = 0
    for shard_index, start in enumerate(range(0, len(source_ids), images_per_shard)):
        positions = tuple(range(start, min(start + images_per_shard, len(source_ids))))
        items = []
        for position in positions:
            for prompt_index, prompt in prompts_for_image(prompts, prompts_per_image, seed, source_ids[position]):
                items.append(WorkItem(item_index, source_ids[position], prompt_index, prompt))
                item_index += 1
        shards.append(ShardPlan(shard_index, positions, tuple(items)))
    return shards


def shards_for_process(shards: list[ShardPlan], process_index: int, num_processes: int) -> list[ShardPlan]:
    """Process ``process_index`` of ``num_processes`` takes every ``num_processes``-th shard: no overlap, no gap."""
    return shards[process_index::num_processes]


def plan_digest(source_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(source_ids).encode()).hexdigest()[:16]


# --- manifest --------------------------------------------------------------------------------------


def check_or_write_manifest(output_dir: Path, manifest: dict, write: bool) -> None:
    """Refuse to resume into a run directory made with a different content config or image list.

    ``write`` is True on the main process only; the others just check (after it wrote).
    """
    path = output_dir / RUN_MANIFEST
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous.get("fingerprint") != manifest["fingerprint"] or previous.get("plan_digest") != manifest["plan_digest"]:
            old, new = previous.get("config", {}), manifest["config"]
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if previous.get("plan_digest") != manifest["plan_digest"]:
                changed.append("<image list of the source>")
            if previous.get("eps") != manifest["eps"]:
                changed.append("<resolved eps>")
            raise ValueError(
                f"{output_dir} holds a run made with different settings (changed: {', '.join(changed) or 'unknown'}); "
                "resume with the same config, or choose a new output_dir"
            )
        return
    if write:
        write_json_atomic(path, manifest)


# --- shards ----------------------------------------------------------------------------------------


def shard_paths(output_dir: Path, shard_index: int) -> tuple[Path, Path]:
    base = output_dir / SHARD_DIR / f"shard-{shard_index:05d}"
    return base.with_suffix(".parquet"), base.with_suffix(".json")


def shard_is_done(output_dir: Path, shard_index: int) -> bool:
    data, marker = shard_paths(output_dir, shard_index)
    return data.is_file() and marker.is_file()


def write_shard(output_dir: Path, shard_index: int, rows: list[dict], features: Features, record: dict) -> None:
    """Write the shard's pairs, then its completion record; each atomically (temp name + rename)."""
    data, marker = shard_paths(output_dir, shard_index)
    data.parent.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # a stale record must never vouch for new data
    columns = {name: [row[name] for row in rows] for name in features}
    table = datasets.Dataset.from_dict(columns, features=features)
    with atomic_file(data) as temporary:
        table.to_parquet(str(temporary))
    write_json_atomic(marker, {**record, "shard_index": shard_index, "num_pairs": len(rows)})


def read_shard_record(output_dir: Path, shard_index: int) -> dict:
    return json.loads(shard_paths(output_dir, shard_index)[1].read_text(encoding="utf-8"))


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete temp files a killed run left behind (shards, and the merge's ``adpo.io.atomic_directory``); returns how many."""
    count = 0
    for path in (output_dir / SHARD_DIR).glob(".*.tmp") if (output_dir / SHARD_DIR).is_dir() else ():
        path.unlink(missing_ok=True)
        count += 1
    for path in [*output_dir.glob(f".{DATASET_DIR}.staging-*"), *output_dir.glob(f".{DATASET_DIR}.old-*")]:
        shutil.rmtree(path, ignore_errors=True)
        count += 1
    return count


def merge_shards(output_dir: Path, num_shards: int, features: Features, keep_unchanged: bool) -> datasets.Dataset:
    """All finished shards, in shard order, as one dataset saved under ``output_dir/dataset``."""
    missing = [i for i in range(num_shards) if not shard_is_done(output_dir, i)]
    if missing:
        raise RuntimeError(
            f"cannot merge: shards {missing[:10]}{'…' if len(missing) > 10 else ''} of {num_shards} are not finished; "
            "run the same command again to complete them"
        )
    files = [str(shard_paths(output_dir, i)[0]) for i in range(num_shards)]
    cache_dir = output_dir / ".merge_cache"
    shutil.rmtree(cache_dir, ignore_errors=True)  # a cache keyed on file names could outlive a redone shard
    non_empty = [f for f, i in zip(files, range(num_shards)) if read_shard_record(output_dir, i)["num_pairs"] > 0]
    target = output_dir / DATASET_DIR
    try:  # the cache is as large as the dataset: a merge that fails (a full disk) must not leave it behind
        if non_empty:
            merged = datasets.Dataset.from_parquet(non_empty, features=features, cache_dir=str(cache_dir))
        else:
            merged = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
        if not keep_unchanged:
            merged = merged.filter(lambda differ: differ, input_columns="answers_differ", desc="dropping unchanged pairs")
        with atomic_directory(target) as staging:
            stamp(merged).save_to_disk(str(staging))
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return datasets.load_from_disk(str(target))


def shard_columns(output_dir: Path, num_shards: int, columns: list[str]) -> dict[str, list]:
    """Selected light columns of every generated pair (before any drop), read straight from the shards."""
    import pyarrow.parquet as pq

    values: dict[str, list] = {name: [] for name in columns}
    for i in range(num_shards):
        table = pq.read_table(shard_paths(output_dir, i)[0], columns=columns)
        for name in columns:
            values[name].extend(table.column(name).to_pylist())
    return values
