"""fla's kernels for lightning attention, Gated DeltaNet and KDA against transformers' torch path, on the CPU.

Runs Triton's interpreter (TRITON_INTERPRET=1, set here before Triton loads) at tiny sizes, so it
needs the `gpu` extra (flash-linear-attention and Triton) and is skipped without it. The interpreter
cannot time configurations, so the autotuner is told every one ties and takes the first. It runs
the fused recurrent kernels (decode: `fused_recurrent_simple_gla`, `fused_recurrent_gated_delta_rule`,
`fused_recurrent_kda`); the chunked ones (prefill: `chunk_simple_gla`, `chunk_gated_delta_rule`,
`chunk_kda`) trip an interpreter limitation (a loop index that is a Python int, `i_t.to(tl.int64)` in
fla/ops/common/chunk_delta_h.py for the last two) and are checked on CUDA by benchmarks/gpu_check.py.
"""
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("fla.ops.simple_gla", reason="needs the gpu extra: pip install -e .[gpu]")
import fla.ops.gated_delta_rule.chunk as gdn_chunk  # noqa: E402
import fla.ops.gated_delta_rule.fused_recurrent as gdn_recurrent  # noqa: E402
import fla.ops.kda.chunk as kda_chunk  # noqa: E402
import fla.ops.kda.fused_recurrent as kda_recurrent  # noqa: E402
from triton.runtime import autotuner  # noqa: E402

from rollout.engine import generate  # noqa: E402
from rollout.kernels import use_delta_rule_kernels, use_fla_lightning  # noqa: E402
from rollout.model import build_hybrid, build_model  # noqa: E402
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


@pytest.mark.parametrize("preset, kernel", [("tiny-qwen3_5", (gdn_recurrent, "fused_recurrent_gated_delta_rule_fwd")),
                                            ("tiny-kimi_linear", (kda_recurrent, "fused_recurrent_kda_fwd"))])
def test_delta_rule_recurrent_kernel_decodes_like_the_torch_path(monkeypatch, preset, kernel):
    # Gated DeltaNet and KDA decode steps through fla's recurrent kernel; prefill stays on the torch path,
    # which the interpreter cannot run in fla (the module docstring). `reference` is what build_model gives
    # on the CPU: the torch path throughout.
    torch.manual_seed(0)
    fla_model = build_model(preset, 32, pad_token_id=0).eval()
    reference = build_model(preset, 32, pad_token_id=0).eval()
    reference.load_state_dict(fla_model.state_dict())
    assert use_delta_rule_kernels(fla_model, "decode") == 3
    calls = []
    module, name = kernel
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda **k: calls.append(k["q"].shape[0]) or real(**k))
    # Mixed prompt lengths (left padding), a fork (n=2), greedy and sampled rows, and a third request
    # that joins when the greedy row leaves.
    requests = [Request([1, 5, 6, 7], n=2, seed=3, params=SamplingParams(max_new_tokens=6, temperature=1.0)),
                Request([1, 9], seed=4, params=SamplingParams(max_new_tokens=3, temperature=0)),
                Request([1, 8, 3], seed=5, params=SamplingParams(max_new_tokens=4, temperature=0))]
    ours = generate(fla_model, requests, pad_id=0, max_batch_rows=3)
    expected = generate(reference, requests, pad_id=0, max_batch_rows=3)
    assert calls and max(calls) == 3  # fla ran the decode steps, on the forked and joined rows
    assert [c.response_ids for c in ours] == [c.response_ids for c in expected]
    for c in ours:
        gap = (teacher_forced(reference, c.prompt_ids, c.response_ids) - torch.tensor(c.logprobs)).abs().max()
        assert gap < 1e-4, (c.prompt_ids, float(gap))


def test_build_model_keeps_delta_rule_layers_on_the_torch_path_on_the_cpu(monkeypatch):
    # transformers binds its GDN and KDA ops to fla on every device whenever fla imports (under the
    # interpreter set here they would then run); on CPU tensors build_model's layers must not reach fla.
    calls = []
    fla_entries = ((gdn_chunk, "chunk_gated_delta_rule_fwd"), (kda_chunk, "chunk_kda_fwd"),
                   (gdn_recurrent, "fused_recurrent_gated_delta_rule_fwd"), (kda_recurrent, "fused_recurrent_kda_fwd"))
    for module, name in fla_entries:
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: calls.append(name))
    for preset in ("tiny-qwen3_5", "tiny-kimi_linear"):
        torch.manual_seed(0)
        model = build_model(preset, 32, pad_token_id=0).eval()
        out = generate(model, [Request([1, 5, 6], n=2, seed=0, params=SamplingParams(max_new_tokens=3))], pad_id=0)
        assert [len(c.response_ids) for c in out] == [3, 3]
    assert calls == []
