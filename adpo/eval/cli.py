"""``adpo eval``: run the robustness protocol from a YAML config, or compare finished reports.

    adpo eval --config configs/eval/world_vqa.yaml [--steps 10 --num_samples 8 ...]
    adpo eval compare runs/eval/original runs/eval/adpo [--names original adpo] [--baseline original] [--out runs/eval/compare]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def compare_main(argv: list[str]) -> int:
    from adpo.eval.report import compare_reports

    parser = argparse.ArgumentParser(prog="adpo eval compare", description="One table and one chart from several eval reports.")
    parser.add_argument("reports", nargs="+", help="report directories (or their report.json)")
    parser.add_argument("--names", nargs="+", help="row labels, one per report (default: each report's name)")
    parser.add_argument("--out", default="runs/eval/compare", help="output directory (compare.md, compare.json, chart)")
    parser.add_argument(
        "--baseline",
        action="append",
        metavar="NAME",
        help="report name to compare the following reports with, question by question (repeatable: each report goes "
        "against the last baseline before it; default: the first report)",
    )
    parser.add_argument(
        "--versus",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "OTHER"),
        help="also compare report NAME with report OTHER question by question, head to head (repeatable)",
    )
    args = parser.parse_args(argv)
    paths = compare_reports(args.reports, args.out, names=args.names, baselines=args.baseline,
                            versus=[tuple(pair) for pair in args.versus])
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"wrote {paths['markdown']}, {paths['json']} and {paths['plot']}")
    return 0


def run_main(argv: list[str]) -> int:
    from adpo.errors import parse_config
    from adpo.eval.config import EvalConfig
    from adpo.eval.loading import prepare
    from adpo.eval.protocol import run_protocol
    from adpo.eval.report import REPORT_JSON, REPORT_MARKDOWN, results_table
    from adpo.runtime import write_stage_outputs

    (config,) = parse_config([EvalConfig], argv, prog="adpo eval",
                             description="Evaluate clean and adversarial robustness of an LVLM (or a CLIP encoder).")
    model, samples, pixels, class_names = prepare(config)
    report = run_protocol(config, model, samples, pixels, class_names=class_names)
    print(results_table([report]))
    for check in report["sanity"]:
        if check["status"] != "pass":
            print(f"{check['status'].upper()} {check['check']}: {check['detail']}")
    write_stage_outputs(config.output_dir, report=Path(config.output_dir) / REPORT_JSON)
    print(f"wrote {config.output_dir}/{REPORT_MARKDOWN} (+ report.json and plots)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    from adpo.runtime import run_as_process

    sys.exit(run_as_process(main))
