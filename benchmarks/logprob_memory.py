"""Naive against chunked fp32-head logprobs + entropy, forward and backward, in one process.

Both variants compute per-token log π(target) and entropy from hidden states and the LM head,
then backpropagate a per-token loss into both. Peak memory is the rise of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over what was resident before the
variant ran, or torch's peak allocation on CUDA. Prints one JSON line.

    python benchmarks/logprob_memory.py [--tokens 8192] [--vocab 200064] [--hidden 256] [--chunk 256]

The naive variant materializes several [tokens, vocab] fp32 tensors (~3 live at its peak); when that
would not fit in half the memory available, tokens are halved until it does, and the line says so
(on a 24 GiB machine, T = 8192 at vocab 200,064 becomes 2048).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rollout.model import token_logprobs  # noqa: E402

NAIVE_LIVE_COPIES = 4  # [tokens, vocab] fp32 tensors alive at the naive peak: ~3 measured, 4 for headroom


def naive(hidden, weight, targets, temperature):
    logp_all = torch.log_softmax((hidden.float() @ weight.float().t()) / temperature, -1)
    with torch.no_grad():  # entropy is a metric here, so naive does not keep a graph for it
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None]).squeeze(-1), entropy


def _kib(field: str, path: str = "/proc/self/status") -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in {path}")


def measure(fn, hidden, weight, targets, upstream, device) -> tuple[float, float, tuple]:
    """(seconds, peak MiB above the starting point, (logp, grad_hidden, grad_weight)) for one forward+backward."""
    hidden.grad = weight.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _kib("VmRSS") * 1024
    t0 = time.perf_counter()
    logp, _ = fn(hidden, weight, targets)
    (logp * upstream).sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _kib("VmHWM") * 1024
    return seconds, (peak - base) / 2**20, (logp.detach(), hidden.grad, weight.grad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=200_064)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=256, help="chunk_tokens of the chunked variant")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    free = torch.cuda.mem_get_info()[0] if args.device == "cuda" else _kib("MemAvailable", "/proc/meminfo") * 1024
    tokens = args.tokens
    while tokens > args.chunk and NAIVE_LIVE_COPIES * tokens * args.vocab * 4 > free / 2:
        tokens //= 2

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, args.hidden, generator=g).to(args.device).requires_grad_(True)
    weight = torch.randn(args.vocab, args.hidden, generator=g) * args.hidden**-0.5
    weight = weight.to(args.device).requires_grad_(True)
    targets = torch.randint(0, args.vocab, (tokens,), generator=g).to(args.device)
    upstream = torch.randn(tokens, generator=g).to(args.device)  # stands in for ∂loss/∂log π of a policy loss
    variants = {
        "naive": lambda h, w, t: naive(h, w, t, args.temperature),
        "chunked": lambda h, w, t: token_logprobs(h, w, t, temperature=args.temperature, chunk_tokens=args.chunk),
    }

    times, peaks, outputs = {k: [] for k in variants}, {k: [] for k in variants}, {}
    for _ in range(args.repeats):  # interleaved, so load from other processes hits both alike
        for name, fn in variants.items():
            seconds, peak_mib, out = measure(fn, hidden, weight, targets, upstream, args.device)
            times[name].append(seconds)
            peaks[name].append(peak_mib)
            outputs[name] = tuple(x.clone() for x in out)
            del out
    diff = max(float((a - b).abs().max()) for a, b in zip(outputs["naive"], outputs["chunked"]))
    t = {k: statistics.median(v) for k, v in times.items()}
    p = {k: statistics.median(v) for k, v in peaks.items()}
    wgrad = args.vocab * args.hidden * 4 / 2**20
    print(json.dumps({
        "device": args.device, "threads": torch.get_num_threads(), "tokens": tokens, "tokens_requested": args.tokens,
        "vocab": args.vocab, "hidden": args.hidden, "chunk_tokens": args.chunk, "repeats": args.repeats,
        "naive_peak_mib": round(p["naive"], 1), "chunked_peak_mib": round(p["chunked"], 1),
        "peak_ratio": round(p["naive"] / p["chunked"], 2),
        # The chunked peak includes the head's fp32 weight gradient, held through its whole backward; the
        # naive peak comes before that gradient exists (measured: the same at hidden 256 and 1024). Without
        # it, the ratio compares the logits' memory alone, the part that grows with tokens.
        "weight_grad_mib": round(wgrad, 1),
        "peak_ratio_without_weight_grad": round(p["naive"] / (p["chunked"] - wgrad), 2),
        "naive_time_s": round(t["naive"], 3), "chunked_time_s": round(t["chunked"], 3),
        "time_ratio": round(t["chunked"] / t["naive"], 3),
        "max_abs_diff": diff,
    }))


if __name__ == "__main__":
    main()
