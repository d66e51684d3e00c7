import json
import subprocess
import sys

from rewards import code, tiny_code


def test_reference_programs_pass_and_wrong_ones_fail(tmp_path):
    tiny_code.write(tmp_path, train=50)
    train = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    held_out = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert not {r["prompt"] for r in held_out} & {r["prompt"] for r in train}
    for row in held_out[:8]:
        assert set(row["prompt"] + row["target"]) <= set(tiny_code.ALPHABET)
        assert code.score(row["target"], row["answer"]) == 1.0
        assert code.score(row["target"].replace("x*", "x*1+"), row["answer"]) == 0.0


def test_rewards_imports_neither_torch_nor_the_other_packages():
    probe = ("import sys, rewards.registry, rewards.pool, rewards.sandbox, rewards.tiny_code\n"
             "print(sorted(m for m in ('torch', 'cispo', 'rollout') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
