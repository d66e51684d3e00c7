import time

from rewards.math import score, verify_boxed
from rewards.pool import ScoringPool


def _hang(seconds: float) -> float:
    time.sleep(seconds)
    return 1.0


def _boom(_: str) -> float:
    raise RuntimeError("reward exploded")


def test_pool_scores_in_order_and_isolates_hangs_and_errors():
    with ScoringPool(num_workers=2, timeout_s=1.5) as pool:
        items = [(f"so \\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(30)]
        results = pool.map(verify_boxed, items)
        assert [r.score for r in results] == [float(i % 3 != 0) for i in range(30)]
        t0 = time.monotonic()
        hung = pool.map(_hang, [(30.0,), (0.0,)])
        assert time.monotonic() - t0 < 10
        assert [r.status for r in hung] == ["timeout", "ok"] and hung[1].score == 1.0
        failed = pool.map(_boom, [("x",)])[0]
        assert failed.status == "error" and "reward exploded" in failed.error
        # The pool keeps working after killing and replacing a worker.
        assert pool.map(verify_boxed, [("\\boxed{7}", "7")])[0].score == 1.0


def test_math_score_public_api():
    assert score("<think>maybe \\boxed{3}</think> so \\boxed{42}", "42") == 1.0
    assert score("\\boxed{41}", "42") == 0.0
    assert score("no box here: 42", "42") == 0.0
    assert score("\\boxed{1,234}", "Natalia sold ... #### 1234") == 1.0
