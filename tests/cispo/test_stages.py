from cispo.sections import StagesConfig
from cispo.stages import advance

M1 = StagesConfig(windows=[40_000, 48_000, 56_000, 64_000, 72_000, 80_000], p99_fraction=0.95, plateau_steps=3,
                  plateau_tolerance=0.02)


def rows(window: int, p99: list[float], ppl: list[float]) -> list[dict]:
    return [{"window": window, "response_length_p99": a, "response_perplexity": b} for a, b in zip(p99, ppl)]


def run(policy, cfg: StagesConfig, steps: int) -> list[tuple[int, int, str]]:
    """Step the rule as the loop would, with synthetic metrics `policy(window, steps in it) -> (p99,
    perplexity)`; return the transitions (step, new window, reason)."""
    log, moves, age = [], [], 0
    for step in range(1, steps + 1):
        window, _ = advance(log, cfg)
        age = age + 1 if log and log[-1]["window"] == window else 1
        p99, ppl = policy(window, age)
        log.append({"step": step, "window": window, "response_length_p99": p99, "response_perplexity": ppl})
        new, reason = advance(log, cfg)
        if reason:
            moves.append((step, new, reason))
    return moves


def test_first_window_and_no_move_without_both_conditions():
    assert advance([], M1) == (40_000, None)
    # Length near the window but perplexity still falling: stay.
    assert advance(rows(40_000, [39_000] * 6, [3.0, 2.8, 2.6, 2.4, 2.2, 2.0]), M1) == (40_000, None)
    # Perplexity flat but p99 far below the window: stay.
    assert advance(rows(40_000, [20_000] * 6, [2.0] * 6), M1) == (40_000, None)
    # Both, but fewer than 2 x plateau_steps rows in this window: stay.
    assert advance(rows(40_000, [39_000] * 5, [2.0] * 5), M1) == (40_000, None)


def test_advances_when_p99_nears_window_and_perplexity_plateaus():
    window, reason = advance(rows(40_000, [30_000, 35_000, 38_000, 38_500, 39_000, 39_200],
                                  [2.00, 2.01, 1.99, 2.00, 2.00, 2.01]), M1)
    assert window == 48_000 and reason.startswith("length_and_plateau: p99 length 39200 >= 0.95 x 40000")


def test_only_the_current_windows_rows_count():
    earlier = rows(40_000, [39_000] * 6, [2.0] * 6)
    # Just moved to 48K: the 40K rows must not satisfy 48K's plateau.
    assert advance(earlier + rows(48_000, [47_000] * 2, [2.0] * 2), M1) == (48_000, None)


def test_last_window_stays_and_rows_without_window_count_as_first():
    assert advance(rows(80_000, [79_900] * 8, [1.0] * 8), M1) == (80_000, None)
    legacy = [{"response_length_p99": 39_500, "response_perplexity": 2.0}] * 6
    assert advance(legacy, M1)[0] == 48_000


def test_synthetic_run_walks_every_m1_window_in_order():
    # In each window, p99 climbs towards it and perplexity settles after a few steps.
    def policy(window, age):
        return window * min(0.99, 0.7 + 0.05 * age), 2.0 + 0.5 * max(0, 4 - age)

    moves = run(policy, M1, steps=100)
    assert [w for _, w, _ in moves] == M1.windows[1:]
    assert all(r.startswith("length_and_plateau") for _, _, r in moves)
    # p99 reaches 0.95 x window at a window's 5th step; perplexity is flat from its 4th, so 3 + 3 flat steps at the 9th.
    assert [s for s, _, _ in moves] == [9, 18, 27, 36, 45]


def test_max_steps_per_stage_fires_when_the_length_never_grows():
    cfg = StagesConfig(windows=[10, 11, 12], plateau_steps=3, max_steps_per_stage=5)
    moves = run(lambda window, age: (4.0, 1.5), cfg, steps=12)
    assert [(s, w) for s, w, _ in moves] == [(5, 11), (10, 12)]
    assert moves[0][2] == "max_steps: 5 steps at window 10"
