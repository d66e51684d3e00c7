import json

from cispo.config import load_recipe
from cispo.data import read_rows
from cispo.filter import filter_by_pass_rate
from tests.conftest import REPO


def by_answer(response: str, answer: str) -> float:
    """Answers 0 mod 3 always pass, 1 mod 3 never do, 2 mod 3 pass on even-length responses (sometimes)."""
    kind = int(answer) % 3
    return 1.0 if kind == 0 else 0.0 if kind == 1 else float(len(response) % 2 == 0)


def test_filter_keeps_prompts_with_pass_rate_strictly_inside_the_band(tmp_path):
    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+0=", "answer": str(a)}) + "\n" for a in range(9)))
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", [
        "data.source=jsonl", f"data.path={rows}", "data.prompts_per_step=9", "rollout.max_new_tokens=4",
        "reward.name=tests.cispo.test_filter:by_answer"])
    out = tmp_path / "kept.jsonl"
    counts = filter_by_pass_rate(recipe, out, n=10, low=0.0, high=1.0)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert counts == {"jsonl": {"kept": len(kept), "dropped": 9 - len(kept)}}
    # Always-solved and never-solved prompts carry no signal and go; only the "sometimes" ones can stay.
    assert all(int(k["answer"]) % 3 == 2 and 0.0 < k["pass_rate"] < 1.0 for k in kept)
    # The output is a plain `format: jsonl` source.
    assert [p.text for p in read_rows(out)[0]] == [k["prompt"] for k in kept]
