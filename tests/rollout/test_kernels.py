"""fla's lightning-attention kernels against transformers' torch implementation, on the CPU.

Runs Triton's interpreter (TRITON_INTERPRET=1, set here before Triton loads) at tiny sizes, so it
needs the `gpu` extra (flash-linear-attention and Triton) and is skipped without it. The interpreter
cannot time configurations, so the autotuner is told every one ties and takes the first. It runs
the fused recurrent kernel (decode); the chunked one (prefill) trips an interpreter limitation (a
loop index that is a Python int) and is checked on CUDA by benchmarks/gpu_check.py instead.
"""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("fla.ops.simple_gla", reason="needs the gpu extra: pip install -e .[gpu]")
from triton.runtime import autotuner  # noqa: E402

from rollout.engine import generate  # noqa: E402
from rollout.kernels import use_fla_lightning  # noqa: E402
from rollout.model import build_hybrid  # noqa: E402
from rollout.trajectory import Request, SamplingParams  # noqa: E402
from tests.rollout.reference import teacher_forced  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def untimed_autotuner(monkeypatch):
    monkeypatch.setattr(autotuner.Autotuner, "do_bench", property(lambda self: lambda fn, quantiles: [1.0] * 3))


def test_recurrent_kernel_decodes_like_the_torch_path():
    torch.manual_seed(0)
    reference = build_hybrid("tiny", 32, num_hidden_layers=3, layer_types=["linear_attention"] * 2 + ["full_attention"]).eval()
    fla_model = build_hybrid("tiny", 32, num_hidden_layers=3, layer_types=reference.config.layer_types).eval()
    fla_model.load_state_dict(reference.state_dict())
    assert use_fla_lightning(fla_model) == 2
    # One-token prompts: every forward is a single token, so each runs the recurrent kernel.
    requests = [Request([1], n=2, seed=3, params=SamplingParams(max_new_tokens=6, temperature=1.0)),
                Request([2], seed=4, params=SamplingParams(max_new_tokens=4, temperature=0))]
    ours = generate(fla_model, requests, pad_id=0, max_batch_rows=2)  # the third row joins when one leaves
    expected = generate(reference, requests, pad_id=0, max_batch_rows=2)
    assert [c.response_ids for c in ours] == [c.response_ids for c in expected]
    for c in ours:
        expected = teacher_forced(reference, c.prompt_ids, c.response_ids)
        assert (expected - torch.tensor(c.logprobs)).abs().max() < 1e-4
