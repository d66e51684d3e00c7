"""The fp32-head experiment (experiments/fp32_head.py, M1 §3.2): the engine's head dtype option and the figures."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments.fp32_head import agreement, measure
from rollout.model import build_hybrid, save_model
from rollout.trajectory import Request, SamplingParams
from tests.conftest import REPO


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_tokenizer):
    """A random tiny hybrid whose head is scaled so its logits reach about ±8, like the warm-started
    Countdown model's (a fresh head's logits are ~0.2, too small for bf16 rounding to show)."""
    torch.manual_seed(0)
    tok = tiny_tokenizer
    model = build_hybrid("tiny", len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    path = tmp_path_factory.mktemp("sharp-tiny")
    save_model(model, tok, path)
    return path


def _requests(tok):
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    return [Request(tok(p)["input_ids"], n=4, seed=i, params=params) for i, p in enumerate(["1+2=", "34+5=", "9="])]


def test_fp32_head_rollout_logprobs_match_the_trainer_and_a_bf16_head_does_not(sharp_model_dir, tiny_tokenizer):
    # fp32 weights isolate the head: the engine with M1's fp32 head reproduces the trainer's forward,
    # the same engine with a bf16 head is off by bf16's rounding of logits up to ~8 (spacing 1/32).
    logprobs = measure(sharp_model_dir, _requests(tiny_tokenizer), body_dtype=torch.float32)
    fp32, bf16 = (agreement(logprobs[h]["rollout"], logprobs[h]["trainer"]) for h in ("fp32_head", "bf16_head"))
    assert fp32["tokens"] >= 12 and bf16["tokens"] >= 12
    assert fp32["max_abs_logprob_diff"] < 1e-4
    assert bf16["max_abs_logprob_diff"] > 1e-3
    assert bf16["mean_abs_logprob_diff"] > 10 * fp32["mean_abs_logprob_diff"]


def test_agreement_reports_pearson_r_of_probabilities_and_logprob_gaps():
    rollout, trainer = np.log([0.1, 0.2, 0.3, 0.4]), np.log([0.1, 0.25, 0.3, 0.35])
    # By hand: deviations from the mean 0.25 are (-.15, 0, .05, .1) and (-.15, -.05, .05, .15).
    r = 0.04 / math.sqrt(0.035 * 0.05)
    out = agreement(torch.tensor(rollout), torch.tensor(trainer))
    assert out["tokens"] == 4
    assert out["pearson_r"] == pytest.approx(r, rel=1e-6)
    assert out["max_abs_logprob_diff"] == pytest.approx(math.log(0.25 / 0.2), rel=1e-6)
    assert out["mean_abs_logprob_diff"] == pytest.approx((math.log(0.25 / 0.2) + math.log(0.4 / 0.35)) / 4, rel=1e-6)
    with pytest.raises(ValueError, match="equal-length"):
        agreement(rollout, trainer[:3])


def test_the_script_prints_both_heads_figures_and_writes_the_plot(tmp_path, tiny_model_dir):
    out = tmp_path / "fp32_head.png"
    run = subprocess.run([sys.executable, "experiments/fp32_head.py", "--model", str(tiny_model_dir), "--prompts",
                          "data/countdown/eval.jsonl", "--num-prompts", "2", "--n", "2", "--max-new-tokens", "4",
                          "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    for head in ("bf16_head", "fp32_head"):
        assert 4 <= line[head]["tokens"] <= 16  # 2 prompts x 2 responses of 1-4 tokens
        assert 0.9 < line[head]["pearson_r"] <= 1.0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
