"""`cispo compare`: the spec's checks, steps-to-target, and a real comparison of two losses whose
tables are read back against the runs' own metrics.jsonl and summary.json."""
import json
import re

import pytest
import yaml

from cispo.cli import main
from cispo.config import dump_recipe, load_recipe
from cispo.compare import collect, load_spec, render, steps_to_target
from tests.conftest import REPO


def test_steps_to_target_is_the_first_evaluated_step_at_or_above_it():
    curve = [(0, 0.2), (5, 0.35), (10, 0.5), (15, 0.45), (20, 0.6)]
    assert steps_to_target(curve, 0.5) == 10           # reached exactly counts
    assert steps_to_target(curve, 0.3) == 5
    assert steps_to_target(curve, 0.46) == 10          # the first crossing, not the one after the dip
    assert steps_to_target(curve, 0.55) == 20
    assert steps_to_target(curve, 0.2) == 0            # the warm start already there
    assert steps_to_target(curve, 0.61) is None        # never reached
    assert steps_to_target([], 0.1) is None


def _spec(tmp_path, **changes) -> str:
    spec = {
        "base": str(REPO / "recipes/tiny-countdown.yaml"),
        # The recipe's warm start learns the answer format, so accuracies are above zero (M1's two layer kinds,
        # tests/conftest.py, do not: loss 1.16 against 0.24 after 100 steps, and RL's rewards stayed 0).
        # Colocated (resources.colocate): each of the three runs starts one actor, not two.
        "overrides": ["wandb.mode=disabled", "run.threads=1", "resources.colocate=true", "sft.steps=60",
                      "sft.batch_size=32", "run.max_steps=4", "run.eval_every=2",
                      "data.eval_size=20", "data.prompts_per_step=8", "rollout.n_samples=4",
                      f"data.path={REPO}/data/countdown/train.jsonl", f"data.eval_path={REPO}/data/countdown/eval.jsonl"],
        "seeds": [3],
        "variants": {"cispo": ["algorithm.name=cispo", "algorithm.eps_high=4"],
                     "dapo": ["algorithm.name=dapo", "algorithm.eps_high=0.28", "algorithm.eps_low=0.2"]},
        "main": ["cispo", "dapo"],
        "target": "dapo",
        "sweeps": {"loss": ["cispo", "dapo"]},
        "parallel": 2,
        "out": str(tmp_path / "out"),
        **changes,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_a_bad_variant_is_a_one_line_error_before_any_run(tmp_path, capsys):
    spec = _spec(tmp_path, variants={"cispo": ["algorithm.nme=cispo"], "dapo": []})
    assert main(["compare", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert "variant 'cispo'" in err and "algorithm.nme" in err and "\n" not in err
    assert not (tmp_path / "out" / "cispo").exists()


def test_a_target_that_is_no_variant_is_refused(tmp_path, capsys):
    assert main(["compare", _spec(tmp_path, target="grpo")]) == 2
    assert "no variant named 'grpo'" in capsys.readouterr().err


def _curve(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(0, summary["eval_accuracy_start"])] + [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]


@pytest.mark.slow
def test_compare_runs_both_losses_from_one_warm_start_and_reports_their_numbers(ray_session, tmp_path, capsys,
                                                                                 monkeypatch):
    # Each run is its own `cispo train` process; at RAY_ADDRESS it joins the session's Ray instead of starting one.
    monkeypatch.setenv("RAY_ADDRESS", ray_session.get_runtime_context().gcs_address)
    spec, out = _spec(tmp_path), tmp_path / "out"
    assert main(["compare", spec]) == 0
    printed = capsys.readouterr().out
    report = (out / "compare.md").read_text()
    assert report in printed and (out / "accuracy.png").stat().st_size > 0

    curves = {name: _curve(out / name / "seed-3") for name in ("cispo", "dapo")}
    for name, curve in curves.items():
        assert [s for s, _ in curve] == [0, 2, 4]  # before RL, then every run.eval_every steps
        config = yaml.safe_load((out / name / "seed-3" / "config.yaml").read_text())
        assert config["model"]["path"] == str(out / "warm-start" / "seed-3" / "final") and config["sft"]["steps"] == 0
    # One warm start: both losses begin at the same held-out accuracy.
    assert curves["cispo"][0][1] == curves["dapo"][0][1]

    target = curves["dapo"][-1][1]  # one seed: DAPO's final accuracy is the mean
    assert target > 0 and max(a for _, a in curves["cispo"]) > 0
    assert f"**{target:.3f}**" in report
    for name, curve in curves.items():
        expected = next((s for s, a in curve if a >= target), None)
        assert expected is not None or name != "dapo"  # DAPO reaches its own final accuracy
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} | `algorithm"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == ("not reached" if expected is None else str(expected))
        assert cells[4].startswith(f"{curve[-1][1]:.3f} ± 0.000")
    sweep = report.split("## loss")[1]
    spread = abs(curves["cispo"][-1][1] - curves["dapo"][-1][1])
    assert re.search(rf"Range of the means across the sweep: \*\*{spread:.3f}\*\*", sweep)

    # A second call finds every run finished and runs nothing.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-3/metrics.jsonl")}
    assert main(["compare", spec]) == 0
    assert "3 of 3 runs already finished" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-3/metrics.jsonl")} == before


def test_claims_follow_each_variants_loss_not_its_name(tmp_path):
    """Run dirs written as `cispo train` writes them (config.yaml, metrics.jsonl, summary.json), for
    variants whose names say nothing of their loss: the claims table finds CISPO, DAPO and GRPO by
    `algorithm.name`, and the tables hold each run's numbers."""
    spec = {"a": (["algorithm.name=cispo", "algorithm.eps_high=4"], [0.2, 0.5, 0.6], 0.01),
            "b": (["algorithm.name=dapo", "algorithm.eps_high=0.28", "algorithm.eps_low=0.2"], [0.2, 0.3, 0.5], 0.2),
            "c": (["algorithm.name=grpo", "algorithm.eps_high=0.2", "algorithm.eps_low=0.2"], [0.2, 0.3, 0.4], 0.3)}
    path = _spec(tmp_path, variants={n: v for n, (v, _, _) in spec.items()}, main=["a", "b", "c"], target="b",
                 sweeps={})
    loaded, out = load_spec(path), tmp_path / "out"
    for name, (variant, accuracy, clipped) in spec.items():
        run = out / name / "seed-3"
        run.mkdir(parents=True)
        dump_recipe(load_recipe(loaded.base, loaded.overrides + variant + [f"run.dir={run}"]), run / "config.yaml")
        rows = [{"step": s, "eval_accuracy": a, "clip_fraction": clipped} for s, a in zip((2, 4), accuracy[1:])]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "summary.json").write_text(json.dumps({"eval_accuracy_start": accuracy[0], "wall_s": 60.0}))
    results, unfinished = collect(loaded, out)
    assert unfinished == []
    report = render(loaded, results, None)
    assert "**0.500**" in report  # b's final accuracy is the target
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert "| 2, not reached |" not in rows["a"] and "| 2 | 2 | 0.600 ± 0.000" in rows["a"] and "| 0.0100 | 60 |" in rows["a"]
    assert "| 4 | 4 | 0.500 ± 0.000" in rows["b"] and "| not reached | not reached |" in rows["c"]
    claims = report.split("## The papers' claims beside ours")[1]
    assert "CISPO (a) 2, DAPO (b) 4; ratio 0.50, so it holds here" in claims
    assert "CISPO ahead by 0.200 in mean final accuracy |" in claims
