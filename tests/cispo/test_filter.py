import json

from cispo.config import load_recipe
from cispo.data import read_rows
from cispo.filter import filter_by_pass_rate
from tests.conftest import REPO


def _recipe(tmp_path, reward="by_answer"):
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+0=", "answer": str(a), "level": a}) + "\n" for a in range(9)))
    return load_recipe(REPO / "recipes/tiny-arith.yaml", [
        "data.source=jsonl", f"data.path={rows}", "data.prompts_per_step=9", "rollout.max_new_tokens=4",
        f"reward.name=tests.rewards.user_rewards:{reward}", "run.threads=1"])


def test_filter_keeps_prompts_with_pass_rate_strictly_inside_the_band(ray_session, tmp_path):
    out = tmp_path / "kept.jsonl"
    counts = filter_by_pass_rate(_recipe(tmp_path), out, n=10, low=0.0, high=1.0)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts == {"jsonl": {"kept": len(kept), "dropped": 9 - len(kept), "unscored": 0}}
    # Always-solved and never-solved prompts carry no signal and go; the "sometimes" ones stay.
    assert sorted(int(k["answer"]) for k in kept) == [2, 5, 8]
    assert all(0.0 < k["pass_rate"] < 1.0 and k["level"] == int(k["answer"]) for k in kept)
    # The output is a plain `format: jsonl` source.
    assert [p.text for p in read_rows(out)[0]] == [k["prompt"] for k in kept]


def test_filter_that_keeps_nothing_says_so(ray_session, tmp_path, capsys):
    counts = filter_by_pass_rate(_recipe(tmp_path), tmp_path / "kept.jsonl", n=4, low=0.99, high=1.0)
    assert counts == {"jsonl": {"kept": 0, "dropped": 9, "unscored": 0}}
    assert "kept none of 9 prompts" in capsys.readouterr().err


def test_responses_that_cannot_be_scored_are_neither_passes_nor_fails(ray_session, tmp_path, capsys):
    """A reward error is counted, never a 0: the three prompts it hits get no pass rate and are dropped as
    unscored, not as 'never solved'; the rest are filtered as before."""
    out = tmp_path / "kept.jsonl"
    counts = filter_by_pass_rate(_recipe(tmp_path, "by_answer_or_raise"), out, n=10, low=0.0, high=1.0)
    assert counts == {"jsonl": {"kept": 3, "dropped": 6, "unscored": 3}}
    assert sorted(int(json.loads(line)["answer"]) for line in out.read_text().splitlines()) == [2, 5, 8]
    assert "30 responses could not be scored" in capsys.readouterr().err
