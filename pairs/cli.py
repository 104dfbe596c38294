"""``adpo pairs --config configs/pairs/<name>.yaml [--key value ...]``: generate a preference-pair dataset.

Also runnable with several processes, each taking every n-th shard::

    accelerate launch --num_processes 4 -m pairs.cli --config configs/pairs/llava15_paper.yaml   # 4 GPUs
    torchrun --nproc_per_node 2 -m pairs.cli --config configs/pairs/world.yaml                   # 2 CPU processes (gloo)

(``accelerate launch --cpu`` starts a single process in accelerate 1.x; use torchrun for several CPU processes.)

Command-line keys override the YAML. Running the same command again resumes a killed run. A bad key or
value raises :class:`adpo.errors.UsageError` before any model loads (one line and exit code 2 as a process).
"""

from __future__ import annotations

import json
import sys

from adpo.errors import parse_config as parse_stage_config
from pairs.config import PairsConfig


def parse_config(argv: list[str] | None) -> PairsConfig:
    (config,) = parse_stage_config([PairsConfig], argv, prog="adpo pairs", description=__doc__.splitlines()[0])
    return config


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = parse_config(argv)
    config.validate()

    from accelerate import PartialState

    from pairs.generate import run

    summary = run(config)
    if PartialState().is_main_process:  # the state run() set up
        counts = summary["counts"]
        print(json.dumps({"output_dir": config.output_dir, **counts}))
    return 0


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
