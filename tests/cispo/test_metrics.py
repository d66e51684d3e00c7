"""metrics.jsonl survives a crash mid-write: a torn last line is dropped with a warning, never a complete one."""
import json
import subprocess
import sys

import pytest

from cispo.cli import main
from cispo.config import RecipeError, dump_recipe, load_recipe
from cispo.metrics import MetricsLog, read_metrics
from tests.conftest import REPO


@pytest.fixture
def run_dir(tmp_path):
    """A run dir whose config.yaml and metrics.jsonl (steps 1-3) are written as a run writes them."""
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["wandb.mode=disabled", "run.max_steps=3"])
    dump_recipe(recipe, tmp_path / "config.yaml")
    log = MetricsLog(tmp_path, recipe, {"data_rows_skipped": 0})
    for step in (1, 2, 3):
        log.log({"step": step, "reward_mean": step / 10, "time_step_s": 1.0})
    return tmp_path


def test_torn_last_line_is_dropped_with_a_warning(run_dir, capsys):
    whole = (run_dir / "metrics.jsonl").read_text()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "reward_mean": 0.')  # the process died here
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropped a torn last line"):
        assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    # `cispo report` plots the whole rows.
    with pytest.warns(UserWarning, match="torn"):
        assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.png").stat().st_size > 0
    # Resume truncates to the checkpoint: the rows it keeps are byte for byte, the torn line is gone.
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["wandb.mode=disabled"])
    with pytest.warns(UserWarning, match="torn"):
        MetricsLog(run_dir, recipe).truncate(2)
    assert (run_dir / "metrics.jsonl").read_text() == "".join(whole.splitlines(keepends=True)[:2])


def test_a_complete_line_is_never_dropped_and_a_malformed_one_is_an_error(run_dir, tmp_path):
    path = run_dir / "metrics.jsonl"
    # The crash came between the row and its newline: the row is whole, so it stays.
    path.write_text(path.read_text() + json.dumps({"step": 4, "reward_mean": 0.4}))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["wandb.mode=disabled"])
    MetricsLog(run_dir, recipe).truncate(4)
    assert path.read_text().endswith('"reward_mean": 0.4}\n')
    # A bad line that is not the last was not torn by a crash: the log is damaged, say where.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"step": 2, "rew\n' + "".join(lines[2:]))
    with pytest.raises(RecipeError, match=r"metrics.jsonl:2: malformed metrics row"):
        read_metrics(run_dir)
    with pytest.raises(RecipeError, match=r"metrics.jsonl:2: malformed"):
        MetricsLog(run_dir, recipe).truncate(1)
    # A file that is one torn line holds no rows.
    only = tmp_path / "only"
    only.mkdir()
    (only / "metrics.jsonl").write_text('{"st')
    with pytest.warns(UserWarning, match="metrics.jsonl:1: dropped a torn last line"):
        assert read_metrics(only) == []


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nope", "run dir {d}/nope does not exist"),
    (lambda d: d, "run dir {d} has no metrics.jsonl"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n{"step": 3}\n') and d,
     "{d}/metrics.jsonl:2: malformed metrics row"),
])
def test_cli_report_errors_are_one_line(tmp_path, make, message):
    run_dir = make(tmp_path)
    out = subprocess.run([sys.executable, "-m", "cispo.cli", "report", str(run_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"cispo: error: {message.format(d=tmp_path)}")
