"""Staged length growth (M1 §5, 80k run): which response-length window the next RL step samples with.

M1 grew the budget 40K -> 48K -> 56K -> 64K -> 72K -> 80K, moving on when generated-sequence perplexity
had converged and the 99th-percentile response length neared the window. The rule is a pure function
of the metrics rows, so a resumed run recomputes the same window from metrics.jsonl.
"""
from __future__ import annotations

import statistics

from cispo.sections import StagesConfig


def advance(rows: list[dict], cfg: StagesConfig) -> tuple[int, str | None]:
    """The window for the next step, and why it moved on (None when it did not).

    `rows` are the run's metrics rows so far, oldest first; each carries the `window` it sampled
    with, `response_length_p99` and `response_perplexity` (exp of minus the mean token logprob of
    the generated responses). Rows without a `window` count as the first stage.
    """
    first = cfg.windows[0]
    if not rows:
        return first, None
    window = rows[-1].get("window", first)
    i = cfg.windows.index(window)
    if i + 1 == len(cfg.windows):
        return window, None
    stage = []  # this window's rows: the trailing run of rows that sampled with it
    for row in reversed(rows):
        if row.get("window", first) != window:
            break
        stage.append(row)
    stage.reverse()
    reason = _rule_fired(stage, window, cfg)
    return (cfg.windows[i + 1], reason) if reason else (window, None)


def _rule_fired(stage: list[dict], window: int, cfg: StagesConfig) -> str | None:
    if cfg.max_steps_per_stage and len(stage) >= cfg.max_steps_per_stage:
        return f"max_steps: {len(stage)} steps at window {window}"
    p99, k = stage[-1]["response_length_p99"], cfg.plateau_steps
    if p99 < cfg.p99_fraction * window or len(stage) < 2 * k:
        return None
    # Plateau: the mean perplexity of the last k steps against the k before (means, because
    # per-step perplexity of a few sampled groups is noisy).
    ppl = [r["response_perplexity"] for r in stage[-2 * k:]]
    before, last = statistics.fmean(ppl[:k]), statistics.fmean(ppl[k:])
    change = abs(last - before) / before
    if change >= cfg.plateau_tolerance:
        return None
    return (f"length_and_plateau: p99 length {p99:g} >= {cfg.p99_fraction:g} x {window}; perplexity "
            f"{before:.4g} -> {last:.4g} ({change:.2%} < {cfg.plateau_tolerance:.2%}, {k}+{k} steps)")
