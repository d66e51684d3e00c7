"""`cispo report` on real runs: three short RL runs from the session's shared warm start (CISPO with seeds
0 and 1, DAPO with seed 0), drawn and tabulated through the command line."""
import json
import statistics
from collections import Counter

import pytest
from PIL import Image

from cispo.cli import main
from cispo.config import load_recipe
from cispo.loop import train
from cispo.metrics import read_metrics
from cispo.report import group_runs, report
from tests.conftest import REPO

RECIPE = REPO / "recipes/tiny-arith.yaml"
# lr 1e-3 moves the policy enough within a batch's two updates for PPO-clip to bind on some tokens.
# 3 steps, evaluated at step 2 (run.eval_every) and at the last, which is no multiple of it.
SHORT = ["data.digits=1", "data.eval_size=10", "data.prompts_per_step=8", "run.max_steps=3", "run.eval_every=2",
         "optim.lr=1e-3", "optim.warmup_steps=0", "wandb.mode=disabled", "run.threads=1"]
DAPO = ["algorithm.name=dapo", "algorithm.eps_high=0.28", "algorithm.eps_low=0.2", "algorithm.normalization=token"]


@pytest.fixture(scope="module")
def runs(warm_arith, tmp_path_factory):
    """Run dirs by name, all under one parent. The warm start is shared (tests/conftest.py: each run's
    model.path), so the runs differ only in what the test names."""
    root = tmp_path_factory.mktemp("report")
    dirs = {}
    for name, extra in [("cispo-0", ["run.seed=0"]), ("cispo-1", ["run.seed=1"]), ("dapo-0", ["run.seed=0", *DAPO])]:
        dirs[name] = root / "runs" / name
        train(load_recipe(RECIPE, [*SHORT, "sft.steps=0", f"model.path={warm_arith}", *extra,
                                   f"run.dir={dirs[name]}"]))
    return dirs


def _table(text: str) -> dict[str, dict[str, str]]:
    """The Markdown table's cells: configuration -> header -> cell."""
    lines = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    header, *rows = lines
    return {row[0]: dict(zip(header, row)) for row in rows}


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _figures(run_dir) -> dict:
    """What the table should hold for one run, read back from its metrics.jsonl (and the accuracy before RL
    from summary.json)."""
    rows = read_metrics(run_dir)
    start = _summary(run_dir)["eval_accuracy_start"]
    evals = [start] + [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
    return {"eval first": evals[0], "eval last": evals[-1], "eval best": max(evals),
            "reward final": rows[-1]["reward_mean"], "length p99 final": rows[-1]["response_length_p99"],
            "IS weight max": max(r["is_weight_max"] for r in rows)}


FORMATS = {"eval first": ".3f", "eval last": ".3f", "eval best": ".3f", "reward final": ".3f",
           "length p99 final": ".1f", "IS weight max": ".2f"}


@pytest.mark.slow  # the shared fixture: a warm start and three RL runs, 2-10 minutes on 2 cores
def test_report_draws_and_tabulates_real_runs(runs, tmp_path, capsys):
    assert main(["report", *(str(runs[n]) for n in ("cispo-0", "cispo-1", "dapo-0")), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    with Image.open(tmp_path / "report.png") as png:
        png.verify()  # a whole, valid PNG
        assert png.format == "PNG" and png.size[0] > 1000 and png.size[1] > 500
    text = (tmp_path / "report.md").read_text()
    assert text in printed
    table = _table(text)
    cispo, dapo = sorted(table, key=lambda label: "dapo" in label)
    # Labelled by the recipe file and the keys that differ; the seed is not one of them.
    assert cispo.startswith("tiny-arith algorithm.name=cispo algorithm.eps_high=4.0") and "run.seed" not in cispo
    assert dapo == "tiny-arith " + " ".join(DAPO)
    assert table[cispo]["runs"] == "2" and table[dapo]["runs"] == "1" and table[dapo]["steps"] == "3"

    expected = _figures(runs["dapo-0"])
    for header, fmt in FORMATS.items():
        assert table[dapo][header] == f"{expected[header]:{fmt}}", header
    seeds = [_figures(runs["cispo-0"]), _figures(runs["cispo-1"])]
    for header, fmt in FORMATS.items():
        values = [s[header] for s in seeds]
        assert table[cispo][header] == f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}", header

    # The tokens PPO-clip would have zeroed most often, summed over the DAPO run's rows.
    counts = Counter()
    for row in read_metrics(runs["dapo-0"]):
        counts.update({(i, text): n for i, text, n in row["ppo_zeroed_tokens"]})
    assert f"- {dapo}: " + ", ".join(f"{text!r} {n}" for (_, text), n in counts.most_common(10)) + "\n" in text


@pytest.mark.slow
def test_metrics_rows_carry_eval_accuracy_and_the_fork_tokens(runs):
    rows = read_metrics(runs["dapo-0"])
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [2, 3]  # run.eval_every=2, and the last step
    assert rows[-1]["eval_accuracy"] == _summary(runs["dapo-0"])["eval_accuracy_end"]
    # Every row names its PPO-zeroed tokens (id, text, count), and names some exactly when some were zeroed.
    for row in rows:
        assert all(isinstance(i, int) and isinstance(text, str) and n > 0 for i, text, n in row["ppo_zeroed_tokens"])
        assert bool(row["ppo_zeroed_tokens"]) == (row["ppo_zeroed_fraction"] > 0)
    assert any(r["ppo_zeroed_fraction"] > 0 for r in rows), "DAPO's clip never bound: the check ran on nothing"


@pytest.mark.slow
def test_seeds_form_one_configuration_drawn_as_mean_and_band(runs):
    cispo, dapo = group_runs([runs["cispo-0"], runs["dapo-0"], runs["cispo-1"]])
    assert [r.dir for r in cispo.runs] == [runs["cispo-0"], runs["cispo-1"]]
    assert [r.dir for r in dapo.runs] == [runs["dapo-0"]]
    steps, mean, low, high = cispo.curve("reward_mean")
    per_seed = [[r["reward_mean"] for r in read_metrics(runs[n])] for n in ("cispo-0", "cispo-1")]
    assert steps == [1, 2, 3]
    assert mean == pytest.approx([statistics.fmean(v) for v in zip(*per_seed)])
    assert low == [min(v) for v in zip(*per_seed)] and high == [max(v) for v in zip(*per_seed)]
    assert cispo.curve("eval_accuracy")[0] == [0, 2, 3]  # before RL, then each eval step

    # One configuration alone is named by its recipe; several runs default to their common parent dir.
    assert [c.label for c in group_runs([runs["cispo-0"], runs["cispo-1"]])] == ["tiny-arith"]
    result = report([runs["cispo-0"], runs["dapo-0"]])
    assert result.figure == runs["cispo-0"].parent / "report.png" and result.table.read_text() == result.text
    assert [row["configuration"] for row in result.rows] == [c.label for c in result.configurations]
    assert report([runs["dapo-0"]]).figure == runs["dapo-0"] / "report.png"


# A missing dir, a dir without metrics.jsonl and a malformed row: tests/cispo/test_metrics.py.
@pytest.mark.parametrize("make, expected", [
    (lambda d: (d / "metrics.jsonl").touch(), "{d}/metrics.jsonl holds no rows yet"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n'), "run dir {d} has no config.yaml"),
], ids=["empty-metrics", "no-config"])
def test_unreadable_run_dir_is_a_one_line_error_naming_it(make, expected, tmp_path, capsys):
    d = tmp_path / "run"
    d.mkdir()
    make(d)
    assert main(["report", str(d)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cispo: error: {expected.format(d=d)}") and err.count("\n") == 1
    assert not (d / "report.png").exists()
