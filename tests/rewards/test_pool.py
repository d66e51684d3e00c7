import time

from rewards.math import score, verify_boxed
from rewards.pool import ScoringPool
from rewards.types import RewardInput


def _hang(response: str, answer: str) -> float:
    time.sleep(float(response))
    return 1.0


def _boom(response: str, answer: str) -> float:
    raise RuntimeError("reward exploded")


def sample(response: str, answer: str = "") -> RewardInput:
    return RewardInput(prompt="", response=response, answer=answer, source="test")


def test_pool_scores_in_order_and_isolates_hangs_and_errors():
    with ScoringPool(num_workers=2, timeout_s=30.0) as pool:  # the first call imports math-verify: slow under load
        items = [sample(f"so \\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(30)]
        results = pool.map(verify_boxed, items)
        assert [r.score for r in results] == [float(i % 3 != 0) for i in range(30)]
        pool.timeout_s = 1.5
        t0 = time.monotonic()
        hung = pool.map(_hang, [sample("30"), sample("0")])
        assert time.monotonic() - t0 < 10
        assert [r.status for r in hung] == ["timeout", "ok"] and hung[1].score == 1.0
        failed = pool.map(_boom, [sample("x")])[0]
        assert failed.status == "error" and "reward exploded" in failed.error
        # The pool keeps working after killing and replacing a worker.
        pool.timeout_s = 30.0
        assert pool.map(verify_boxed, [sample("\\boxed{7}", "7")])[0].score == 1.0


def test_math_score_public_api():
    assert score("<think>maybe \\boxed{3}</think> so \\boxed{42}", "42") == 1.0
    assert score("\\boxed{41}", "42") == 0.0
    assert score("no box here: 42", "42") == 0.0
    assert score("\\boxed{1,234}", "Natalia sold ... #### 1234") == 1.0
