import json

import pytest

from rewards import countdown
from rewards.registry import resolve
from rewards.types import RewardInput

GOLD = json.dumps({"numbers": [3, 5, 2], "target": 13})


@pytest.mark.parametrize("response", ["3*5-2", "5*3-2", "2*5+3", "3+2*5", "(5*2)+3", " 3 + 5 * 2 ", "5*2+3"])
def test_every_expression_that_reaches_the_target_scores(response):
    assert countdown.score(response, GOLD) == 1.0


@pytest.mark.parametrize("response", ["3+5+2", "3*5+2", "(3+5)*2", "3-5*2", "13", "", "3*5-", "=3*5-2", "3*5-2=13"])
def test_wrong_values_and_malformed_responses_score_zero(response):
    assert countdown.score(response, GOLD) == 0.0


@pytest.mark.parametrize("response", ["3*5-2+0", "3*5", "5*3-2-2+2", "3*5-1-1", "15-2", "3*5-(2)*(2/2)"])
def test_each_number_exactly_once(response):
    """An extra, missing, reused or unknown number scores 0 even when the value is right."""
    assert countdown.score(response, GOLD) == 0.0


def test_repeated_numbers_count_as_a_multiset():
    gold = json.dumps({"numbers": [4, 4, 3], "target": 19})
    assert countdown.score("4*4+3", gold) == 1.0
    assert countdown.score("4*4+3+4-4", gold) == 0.0


def test_division_is_exact_and_by_zero_scores_zero():
    assert countdown.score("7/2*4-1", json.dumps({"numbers": [7, 2, 4, 1], "target": 13})) == 1.0
    assert countdown.score("7//2*4+1", json.dumps({"numbers": [7, 2, 4, 1], "target": 13})) == 0.0
    assert countdown.score("1/3*3", json.dumps({"numbers": [1, 3, 3], "target": 1})) == 1.0  # not 0.999...
    assert countdown.score("3/(2-2)", json.dumps({"numbers": [3, 2, 2], "target": 0})) == 0.0


@pytest.mark.parametrize("response", [
    "__import__('os').system('touch PWNED')", "open('PWNED','w')", "(lambda: 13)()", "2**3+5", "-2+3*5", "3*5--2+0",
    "0x3*5-2", "3.0*5-2", "1_3", "(" * 500 + "3" + ")" * 500, "13 if 1 else 0", "3*5-2;2",
])
def test_nothing_but_numbers_and_four_operators_is_evaluated(response, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert countdown.score(response, GOLD) == 0.0
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("answer", ["", "13", "[3, 5, 2]", '{"numbers": [3, 5, 2]}', '{"numbers": [], "target": 1}',
                                    '{"numbers": [3, "5"], "target": 8}', '{"numbers": [3, 5], "target": 8.0}',
                                    '{"numbers": [true, 5], "target": 6}'])
def test_a_malformed_gold_answer_raises(answer):
    with pytest.raises(ValueError, match="countdown answer"):
        countdown.score("3+5", answer)


def test_the_data_holds_no_solutions_and_keeps_eval_problems_out_of_train(tmp_path):
    accuracy = countdown.write(tmp_path, held_out=50)
    splits = {name: [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
              for name in ("train", "eval")}
    key = lambda row: (sorted(json.loads(row["answer"])["numbers"]), json.loads(row["answer"])["target"])
    assert len(splits["eval"]) == 50
    assert not {str(key(r)) for r in splits["eval"]} & {str(key(r)) for r in splits["train"]}
    for name, rows in splits.items():
        right = [countdown.score(r["target"], r["answer"]) for r in rows]
        assert accuracy[f"{name}.jsonl"] == sum(right) / len(rows)
        assert 0.1 < sum(right) / len(rows) < 0.4  # the demonstrator is right only by chance
        for row in rows:
            numbers, target = countdown.parse_answer(row["answer"])
            assert row["prompt"] == countdown.problem_text(numbers, target)
            assert set(row["prompt"] + row["target"]) <= set(countdown.ALPHABET)
            assert sorted(int(c) for c in row["target"] if c.isdigit()) == sorted(numbers)


@pytest.mark.parametrize("ops", ["+-", "+-*"])
def test_every_problem_is_solvable_in_the_order_given(ops):
    found = countdown.problems(ops)
    assert len(found) == len(set(found)) > 1000
    for numbers, target in found[::7]:
        gold = json.dumps({"numbers": list(numbers), "target": target})
        assert any(countdown.score(f"{numbers[0]}{x}{numbers[1]}{y}{numbers[2]}", gold) for x in ops for y in ops)


def test_recipes_name_it_as_module_function():
    reward = resolve("rewards.countdown:score")
    inputs = [RewardInput(prompt="3,5,2:13=", response=r, answer=GOLD, source="countdown") for r in ("3*5-2", "3+5+2")]
    assert reward.fn is countdown.score and reward(inputs) == [1.0, 0.0]
