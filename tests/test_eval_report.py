"""Reports, plots, sanity checks and `compare` on synthetic reports (no model needed)."""

import json

import numpy as np
import pytest
from PIL import Image

from adpo.errors import UsageError
from adpo.eval.report import (
    REPORT_FORMAT,
    REPORT_VERSION,
    compare_reports,
    load_report,
    paired_comparison,
    results_table,
    sanity_checks,
    sign_test_p_value,
    write_report,
)


def synthetic_report(name="model", clean=(1, 1, 1, 0), robust=None, attack_only=None, step_check=None, steps=None):
    """A VQA report over four samples; ``robust`` maps eps label -> per-sample exact-match scores, ``steps`` eps label
    -> per-sample gradient steps (default: 10 on each sample not broken before that eps, else 0)."""
    robust = robust if robust is not None else {"2/255": (1, 0, 0, 0), "4/255": (0, 0, 0, 0)}
    eps_values = {"2/255": 2 / 255, "4/255": 4 / 255, "8/255": 8 / 255}
    samples = []
    for index, clean_score in enumerate(clean):
        sample = {
            "id": f"s{index}",
            "prompt": "What shape?",
            "references": ["circle"],
            "clean": {"output": "circle" if clean_score else "square", "scores": {"exact_match": float(clean_score)},
                      "broken": not clean_score},
            "robust": {},
        }
        before = clean_score
        for label, scores in robust.items():
            only = attack_only[label][index] if attack_only else scores[index]
            sample["robust"][label] = {
                "output": "circle" if scores[index] else "square",
                "scores": {"exact_match": float(scores[index])},
                "broken": not scores[index],
                "attack_only_scores": {"exact_match": float(only)},
                "source": "answer:circle",
                "attacked": bool(clean_score),
                "steps": steps[label][index] if steps else 10 * bool(before),
            }
            before = scores[index]
        samples.append(sample)
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "name": name,
        "model": f"hub/{name}",
        "task": "vqa",
        "primary_metric": "exact_match",
        "metrics": ["exact_match"],
        "num_samples": len(clean),
        "protocol": {"summary": "APGD, 100 steps."},
        "config": {},
        "clean": {"exact_match": float(np.mean(clean))},
        "robust": [
            {
                "eps": eps_values[label],
                "eps_label": label,
                "steps": 100,
                "metrics": {"exact_match": float(np.mean(scores))},
                "attack_only_metrics": {"exact_match": float(np.mean(scores))},
                "num_attacked": int(sum(clean)),
                "gradient_steps": 30,
                "seconds": 1.0,
            }
            for label, scores in robust.items()
        ],
        "step_check": step_check,
        "samples": samples,
        "examples": [],
        "timing": {"seconds": 3.0, "device": "cpu"},
    }


def statuses(report):
    return {check["check"]: check["status"] for check in sanity_checks(report)}


def test_sanity_checks_pass_on_a_consistent_report():
    report = synthetic_report(step_check={"eps_label": "4/255", "steps": 10, "metrics": {"exact_match": 0.25}, "per_sample": {}})
    assert statuses(report) == {"robust_le_clean": "pass", "monotone_in_eps": "pass", "more_steps_not_weaker": "pass",
                                "attack_took_steps": "pass"}


def test_an_attack_without_a_gradient_step_on_a_sample_it_had_to_break_fails():
    # s0 stays right at 2/255 and 4/255, so both attacks had to run on it; s1 and s2 fall at 2/255, s3 is wrong clean.
    robust = {"2/255": (1, 0, 0, 0), "4/255": (1, 0, 0, 0)}
    lazy = synthetic_report(robust=robust, steps={"2/255": (10, 10, 10, 0), "4/255": (0, 0, 0, 0)})
    check = next(c for c in sanity_checks(lazy) if c["check"] == "attack_took_steps")
    assert check["status"] == "fail" and "s0@4/255" in check["detail"] and "s1" not in check["detail"]
    # No step where the clean image (s3) or a smaller epsilon (s1, s2 at 4/255) had already broken the sample: fine.
    done = synthetic_report(robust=robust, steps={"2/255": (10, 10, 10, 0), "4/255": (10, 0, 0, 0)})
    assert statuses(done)["attack_took_steps"] == "pass"
    # Nor where the attack's random start broke the sample (s1, s2 at 2/255) before any step.
    assert statuses(synthetic_report(robust=robust, steps={"2/255": (10, 0, 0, 0), "4/255": (10, 0, 0, 0)}))["attack_took_steps"] == "pass"


def test_robust_above_clean_fails_and_attack_above_clean_warns():
    broken = synthetic_report(robust={"2/255": (1, 0, 0, 1), "4/255": (0, 0, 0, 0)})
    assert statuses(broken)["robust_le_clean"] == "fail"
    # Sample s3 is wrong clean; an attack output that is right is kept out of the robust score but flagged.
    weak = synthetic_report(attack_only={"2/255": (1, 0, 0, 1), "4/255": (0, 0, 0, 0)})
    assert statuses(weak)["robust_le_clean"] == "warn"


def test_rise_in_eps_and_more_steps_higher_are_flagged():
    rising = synthetic_report(robust={"2/255": (0, 0, 0, 0), "4/255": (1, 0, 0, 0)})
    assert statuses(rising)["monotone_in_eps"] == "fail"  # impossible with nested balls
    masked = synthetic_report(step_check={"eps_label": "4/255", "steps": 10, "metrics": {"exact_match": 0.0}, "per_sample": {}})
    masked["robust"][1]["metrics"]["exact_match"] = 0.25
    masked["samples"][0]["robust"]["4/255"]["scores"]["exact_match"] = 1.0
    assert statuses(masked)["more_steps_not_weaker"] == "warn"
    assert statuses(synthetic_report())["more_steps_not_weaker"] == "warn"  # not run -> said so


def test_results_table_layout():
    table = results_table([synthetic_report("orig"), synthetic_report("adpo", robust={"2/255": (1, 1, 0, 0), "8/255": (0, 0, 0, 0)})])
    lines = table.splitlines()
    assert lines[0] == "| Model | Clean | ε=2/255 | ε=4/255 | ε=8/255 |"
    assert lines[2] == "| orig | 75.0 | 25.0 | 0.0 | — |"
    assert lines[3] == "| adpo | 75.0 | 50.0 | — | 0.0 |"


def png_ok(path):
    with Image.open(path) as image:
        array = np.asarray(image.convert("L"))
    return path.stat().st_size > 1000 and array.std() > 0


def test_write_report_and_compare(tmp_path):
    first = synthetic_report("original")
    run_dir = tmp_path / "original"
    (run_dir / "examples").mkdir(parents=True)
    rng = np.random.default_rng(0)
    clean_image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    adversarial = np.clip(clean_image.astype(int) + rng.integers(-4, 5, clean_image.shape), 0, 255).astype(np.uint8)
    Image.fromarray(clean_image).save(run_dir / "examples" / "s0_clean.png")
    Image.fromarray(adversarial).save(run_dir / "examples" / "s0_4-255.png")
    first["examples"] = [
        {"id": "s0", "eps_label": "4/255", "clean_image": "examples/s0_clean.png", "adversarial_image": "examples/s0_4-255.png",
         "prompt": "What shape?", "clean_output": "circle", "adversarial_output": "square"}
    ]
    paths = write_report(first, run_dir)
    assert png_ok(paths["plot"]) and png_ok(paths["examples"])
    saved = load_report(run_dir)
    assert saved["sanity"] and saved["clean"]["exact_match"] == 0.75
    markdown = paths["markdown"].read_text()
    assert "| original | 75.0 | 25.0 | 0.0 |" in markdown and "## Sanity checks" in markdown and "examples.png" in markdown

    write_report(synthetic_report("adpo", robust={"2/255": (1, 1, 0, 0), "4/255": (1, 0, 0, 0)}), tmp_path / "adpo")
    out = compare_reports([run_dir, tmp_path / "adpo"], tmp_path / "cmp")
    assert png_ok(out["plot"])
    text = out["markdown"].read_text()
    assert "| original | 75.0 | 25.0 | 0.0 |" in text and "| adpo | 75.0 | 50.0 | 25.0 |" in text
    assert json.loads(out["json"].read_text())["rows"][1]["name"] == "adpo"


def test_compare_refuses_mixed_tasks_and_non_reports(tmp_path):
    write_report(synthetic_report("a"), tmp_path / "a")
    other = synthetic_report("b")
    other["task"], other["primary_metric"] = "caption", "cider"
    other["clean"]["cider"] = 0.5
    for row in other["robust"]:
        row["metrics"]["cider"] = 0.1
    for sample in other["samples"]:
        sample["clean"]["scores"]["cider"] = 0.5
        for robust in sample["robust"].values():
            robust["scores"]["cider"] = 0.1
            robust["attack_only_scores"]["cider"] = 0.1
    write_report(other, tmp_path / "b")
    with pytest.raises(ValueError, match="one task at a time"):
        compare_reports([tmp_path / "a", tmp_path / "b"], tmp_path / "cmp")
    with pytest.raises(FileNotFoundError, match="report.json"):
        load_report(tmp_path / "missing")


def test_sign_test_p_value_on_hand_counted_cases():
    assert sign_test_p_value(0, 0) == 1.0
    assert sign_test_p_value(5, 0) == pytest.approx(2 / 32)  # all five changes one way: 2 * 0.5**5
    assert sign_test_p_value(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # 2 * P(X <= 1), X ~ Bin(4, 1/2)
    assert sign_test_p_value(2, 1) == 1.0  # the doubled tail exceeds one
    assert sign_test_p_value(1, 7) == sign_test_p_value(7, 1)
    with pytest.raises(ValueError, match=">= 0"):
        sign_test_p_value(-1, 2)


def test_sign_test_p_value_matches_scipy_binomtest():
    stats = pytest.importorskip("scipy.stats")
    for gained in range(13):
        for lost in range(13):
            if gained + lost:
                assert sign_test_p_value(gained, lost) == pytest.approx(stats.binomtest(gained, gained + lost, 0.5).pvalue)


def test_paired_comparison_counts_questions_gained_and_lost():
    baseline = synthetic_report("original", robust={"2/255": (1, 0, 0, 0), "4/255": (0, 0, 0, 0)})
    other = synthetic_report("adpo", clean=(1, 1, 0, 1), robust={"2/255": (0, 1, 1, 0), "4/255": (0, 0, 0, 0)})
    rows = {row["column"]: row for row in paired_comparison(other, baseline)}
    assert list(rows) == ["clean", "2/255", "4/255"]
    clean, weak, strong = rows["clean"], rows["2/255"], rows["4/255"]
    assert (clean["gained"], clean["lost"], clean["delta"]) == (1, 1, 0.0)
    assert (weak["gained"], weak["lost"], weak["shared_samples"]) == (2, 1, 4)
    assert weak["delta"] == pytest.approx(0.25) and weak["p_value"] == 1.0
    assert (strong["gained"], strong["lost"], strong["p_value"]) == (0, 0, 1.0)
    assert weak["name"] == "adpo" and weak["baseline"] == "original"
    # only the samples both reports scored count
    other["samples"] = other["samples"][1:]
    assert paired_comparison(other, baseline)[1]["shared_samples"] == 3


def test_compare_pairs_each_report_with_the_last_baseline_before_it(tmp_path, capsys):
    reports = {
        "original (small)": synthetic_report("original (small)", robust={"2/255": (0, 0, 0, 0)}),
        "adpo (small)": synthetic_report("adpo (small)", robust={"2/255": (1, 1, 1, 0)}),
        "original (large)": synthetic_report("original (large)", robust={"2/255": (1, 1, 0, 0)}),
        "adpo (large)": synthetic_report("adpo (large)", robust={"2/255": (1, 1, 1, 0)}),
    }
    for name, report in reports.items():
        write_report(report, tmp_path / name)
    directories = [tmp_path / name for name in reports]
    out = compare_reports(directories, tmp_path / "cmp", baselines=["original (small)", "original (large)"])
    paired = [row for row in json.loads(out["json"].read_text())["paired"] if row["column"] == "2/255"]
    assert [(row["name"], row["baseline"], row["gained"], row["lost"]) for row in paired] == [
        ("adpo (small)", "original (small)", 3, 0),
        ("adpo (large)", "original (large)", 1, 0),
    ]
    text = out["markdown"].read_text()
    assert "| adpo (small) | original (small) | ε=2/255 | +75.0 | 3 | 0 | 0.25 |" in text
    # default: everything against the first report
    default = json.loads(compare_reports(directories, tmp_path / "cmp2")["json"].read_text())["paired"]
    assert {row["baseline"] for row in default} == {"original (small)"} and len({row["name"] for row in default}) == 3
    with pytest.raises(UsageError, match="matches no report.*original \\(small\\)"):
        compare_reports(directories, tmp_path / "cmp3", baselines=["undefended"])
    # from the command line: one line and exit code 2, no traceback
    from adpo.eval.cli import compare_main
    from adpo.runtime import run_as_process

    assert run_as_process(lambda: compare_main([*map(str, directories), "--versus", "undefended", "adpo (small)"])) == 2
    assert capsys.readouterr().err.strip().startswith("adpo: error: --versus ['undefended'] matches no report")


def test_compare_versus_adds_a_head_to_head_comparison(tmp_path):
    reports = {
        "original": synthetic_report("original", robust={"2/255": (0, 0, 0, 0)}),
        "fare": synthetic_report("fare", robust={"2/255": (1, 0, 0, 0)}),
        "adpo": synthetic_report("adpo", robust={"2/255": (0, 1, 1, 0)}),
    }
    for name, report in reports.items():
        write_report(report, tmp_path / name)
    out = compare_reports([tmp_path / name for name in reports], tmp_path / "cmp", versus=[("adpo", "fare")])
    head_to_head = [row for row in json.loads(out["json"].read_text())["paired"] if row["baseline"] == "fare"]
    robust = next(row for row in head_to_head if row["column"] == "2/255")
    assert (robust["name"], robust["gained"], robust["lost"]) == ("adpo", 2, 1)
    with pytest.raises(ValueError, match="--versus"):
        compare_reports([tmp_path / name for name in reports], tmp_path / "cmp2", versus=[("adpo", "tecoa")])
