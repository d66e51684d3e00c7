"""`make results` (experiments/results.py): README's main-job table from each seed's summary.json, with the
mean ± sd of the gains, the machine and the date; a seed already trained is read, not trained again."""
import json
import statistics

from experiments.results import END, START, main


def test_the_table_is_rebuilt_from_each_seeds_summary_and_replaces_the_old_one(tmp_path):
    runs, accuracies = tmp_path / "runs", {0: (0.236, 0.574), 1: (0.230, 0.578), 2: (0.250, 0.430)}
    for seed, (start, end) in accuracies.items():
        (runs / f"seed-{seed}").mkdir(parents=True)
        (runs / f"seed-{seed}" / "summary.json").write_text(json.dumps(
            {"eval_accuracy_start": start, "eval_accuracy_end": end, "wall_s": 600.0 + seed}))
        (runs / f"seed-{seed}" / "load.json").write_text(json.dumps([2.0, 4.0]))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{START}\n| stale | table |\n{END}\nafter\n")
    assert main(["--seeds", "0", "1", "2", "--runs", str(runs), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"before\n{START}\n| seed |") and text.endswith(f"{END}\nafter\n") and "stale" not in text
    assert "| 1 | 0.230 | 0.578 | +0.348 | 10.0 min |" in text and "| 2 | 0.250 | 0.430 | +0.180 | 10.0 min |" in text
    gains = [end - start for start, end in accuracies.values()]
    assert f"**{statistics.fmean(gains):+.3f} ± {statistics.stdev(gains):.3f}**" in text
    assert "smallest +0.180" in text and "cores" in text and "load average 3.0" in text
    readme.write_text("no markers\n")
    assert main(["--seeds", "0", "--runs", str(runs), "--readme", str(readme)]) == 1
    assert readme.read_text() == "no markers\n"
