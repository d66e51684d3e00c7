"""The fp32-head experiment (MiniMax-M1 §3.2, Fig. 3): rollout-time against trainer-time token probabilities,
with the rollout engine's LM head in bf16 and in fp32.

M1 found that on its hybrid model the probabilities the inference engine gave the sampled tokens
correlated poorly with the training forward's, and that computing the LM head in fp32 raised the
Pearson correlation (from about 0.9x to 0.99x). Here, on one model directory:

- rollout: `rollout.engine.CispoEngine` on the model loaded with the workers' weights in bf16
  (`rollout.dtype: bf16`), its weights then published from the trainer's fp32 state as every step does
  (`load_weights`), once with `head_dtype=torch.bfloat16` (the pre-fix head: operands and logits in
  bf16) and once with the fp32 head the engine always uses. Each samples its own responses and
  records each sampled token's logprob while decoding.
- trainer: `cispo.trainer.LogprobModel` (the trainer's forward and chunked fp32 head) on the fp32 model,
  over exactly those responses.

The bf16 head is the engine's own decode with a bf16 head (an option on the engine), not a recomputation
from saved hidden states: M1 compared what its inference engine reported with what its trainer computed,
and only the engine's own decode has the engine's kernels (decode attention, grouped-GEMM experts, the
recurrent lightning state) in it. Both heads draw the same per-token uniforms (rollout.sampling), so their
responses mostly coincide.

    python experiments/fp32_head.py [--model DIR] [--preset tiny] [--prompts data/countdown/eval.jsonl]
        [--num-prompts 128] [--n 8] [--max-new-tokens 16] [--body-dtype bf16] [--out runs/fp32_head.png]

Without --model, a fresh random `--preset` hybrid with the default character tokenizer. Prints one JSON
line: per head, the Pearson r of rollout against trainer probabilities, the number of tokens, and the
max and mean |Δ logprob|. Writes a two-panel scatter plot to --out.

Measured (2-core CPU shared with other runs, --threads 1; defaults: 128 Countdown eval prompts x 8, T = 1):

    model (weights in rollout)                  head   Pearson r   tokens   max |Δ log π|   mean |Δ log π|
    Countdown warm start (bf16)                 bf16   0.999901    5965     0.656           0.00229
                                                fp32   0.999927    5965     0.639           0.00089
    Countdown warm start (fp32, --body-dtype)   bf16   0.999973    5962     0.026           0.00177
                                                fp32   1.000000    5963     6.8e-6          2.1e-7
    random tiny (bf16)                          bf16   0.999953    15187    0.0098          0.00174
                                                fp32   0.999956    15204    0.0090          0.00169
    random small (bf16; --preset small)         bf16   0.999926    15189    0.020           0.00287
                                                fp32   0.999930    15206    0.020           0.00282

The warm start is `cispo train recipes/tiny-countdown.yaml run.max_steps=0 wandb.mode=disabled run.threads=1
run.dir=runs/fp32-head-warm` (100 SFT steps), measured with `--model runs/fp32-head-warm/final`; each
run took 25-150 s.
The direction is M1's: the fp32 head cuts the warm model's mean |Δ log π| 2.6x and with fp32 weights makes
rollout and trainer agree to fp32 rounding. The size is not: r is already 0.9999 with a bf16 head, since
this model's logits stay within ±8 over a 20-token vocabulary, where bf16's spacing (1/32 at most) moves a
log π by a few hundredths (measured: 0.026 at most); the few large gaps (0.65) come from the bf16 body,
not the head. We expect M1's 0.9x only with logits in the tens (bf16 spacing 1/8 to 1/2) over a vocabulary
of ~200k, i.e. a trained model of real size (not measured here); the script takes any engine-supported HF
directory as --model. The random models' logits are near zero, so their gaps are the bf16 body's alone.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cispo.trainer import LogprobModel  # noqa: E402
from rollout.config import ModelConfig, RolloutConfig  # noqa: E402
from rollout.engine import CispoEngine  # noqa: E402
from rollout.model import load_model, load_tokenizer, save_model, starting_model  # noqa: E402
from rollout.routing import RoutingReplay, routing_rows  # noqa: E402
from rollout.trajectory import Request, SamplingParams, Trajectory  # noqa: E402

HEADS = {"bf16_head": torch.bfloat16, "fp32_head": torch.float32}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def rollout(model_dir: str | Path, trainer_state: dict, requests: list[Request], *, body_dtype: torch.dtype,
            head_dtype: torch.dtype, record_routing: bool = False) -> list[Trajectory]:
    """What a rollout worker returns for `requests`: the model loaded in `body_dtype`, the trainer's
    weights published into it (cast to each parameter's dtype), and the engine's head in `head_dtype`;
    with `record_routing`, each token's MoE experts (experiments/routing_replay.py)."""
    tok = load_tokenizer(model_dir)
    engine = CispoEngine(load_model(model_dir, dtype=body_dtype), RolloutConfig(), tok.pad_token_id, tok,
                         head_dtype=head_dtype, record_routing=record_routing)
    engine.load_weights(trainer_state, version=1)
    try:
        return engine.generate(requests)
    finally:
        engine.close()


@torch.no_grad()
def trainer_logprobs(trainer: LogprobModel, completions: list[Trajectory],
                     filler_id: int, rows: int = 64, replay: RoutingReplay | None = None) -> torch.Tensor:
    """log π of every response token [total response tokens] under the trainer's forward, in completion order;
    with `replay` (on the trainer's model), routed to the experts each completion recorded.

    Rows are right-padded with `filler_id`, which leaves a causal model's earlier positions unchanged.
    """
    out = []
    for start in range(0, len(completions), rows):
        chunk = completions[start:start + rows]
        seqs = [c.prompt_ids + c.response_ids for c in chunk]
        ids = torch.full((len(seqs), max(map(len, seqs))), filler_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
        if replay is not None:
            replay.set(routing_rows(chunk, ids.shape[1]), ids.shape[1])
        logp, _ = trainer(ids)  # [rows, width - 1]: position t scores token t + 1
        if replay is not None:
            replay.set(None)
        for i, c in enumerate(chunk):
            first = len(c.prompt_ids) - 1
            out.append(logp[i, first:first + len(c.response_ids)])
    return torch.cat(out)


def agreement(rollout_logp, trainer_logp) -> dict:
    """How well rollout and trainer agree on the same tokens' log π (two equal-length 1-D sequences).

    pearson_r: Pearson correlation of the probabilities exp(log π), the statistic of M1 Fig. 3; also the
    token count and the max and mean |Δ log π|. ValueError if the lengths differ or there are fewer than
    two tokens.
    """
    r, t = (np.asarray(x, dtype=np.float64).ravel() for x in (rollout_logp, trainer_logp))
    if r.shape != t.shape or r.size < 2:
        raise ValueError(f"agreement needs two equal-length sequences of >= 2 logprobs, got {r.size} and {t.size}")
    diff = np.abs(r - t)
    return {"pearson_r": float(np.corrcoef(np.exp(r), np.exp(t))[0, 1]), "tokens": int(r.size),
            "max_abs_logprob_diff": float(diff.max()), "mean_abs_logprob_diff": float(diff.mean())}


def measure(model_dir: str | Path, requests: list[Request], body_dtype: torch.dtype = torch.bfloat16) -> dict:
    """Per head (HEADS): {"rollout": log π [N], "trainer": log π [N]} over the responses that head's rollout sampled."""
    tok = load_tokenizer(model_dir)
    trainer = LogprobModel(load_model(model_dir)).train()  # the trainer's fp32 model, in the mode it trains in
    state = {k: v.detach().clone() for k, v in trainer.causal_lm.state_dict().items()}
    result = {}
    for name, head_dtype in HEADS.items():
        completions = rollout(model_dir, state, requests, body_dtype=body_dtype, head_dtype=head_dtype)
        result[name] = {"rollout": torch.tensor([lp for c in completions for lp in c.logprobs]),
                        "trainer": trainer_logprobs(trainer, completions, tok.eos_token_id)}
    return result


def plot(logprobs: dict, stats: dict, out: Path, title: str, body_dtype: str) -> None:
    """Two panels (one per head): trainer probability on x, rollout probability on y, the diagonal, r in the title.
    `logprobs` is `measure`'s result, `stats` each head's `agreement`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One square range over every panel's points: a random model's probabilities all sit near 1/vocab.
    probs = torch.cat([x.exp() for lp in logprobs.values() for x in lp.values()])
    pad = 0.02 * float(probs.max() - probs.min())
    lim = (float(probs.min()) - pad, float(probs.max()) + pad)
    fig, axes = plt.subplots(1, len(logprobs), figsize=(5 * len(logprobs), 5), sharex=True, sharey=True)
    for ax, (name, lp) in zip(axes, logprobs.items()):
        ax.scatter(lp["trainer"].exp(), lp["rollout"].exp(), s=4, alpha=0.4)
        ax.plot(lim, lim, color="grey", linewidth=0.8)
        s = stats[name]
        ax.set_title(f"{name.replace('_', ' ')}: Pearson r = {s['pearson_r']:.5f} ({s['tokens']} tokens)")
        ax.set_xlabel("trainer probability (fp32 forward, fp32 head)")
        ax.set_ylabel(f"rollout probability (engine, {body_dtype} weights)")
        ax.set_xlim(*lim)
        ax.set_ylim(*lim)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def sampling_args(ap: argparse.ArgumentParser, *, num_prompts: int, n: int, max_new_tokens: int) -> None:
    """The options that pick the model, the prompts and their sampling (experiments/routing_replay.py has them too)."""
    ap.add_argument("--model", help="HF model directory (e.g. RUN_DIR/final); default: a fresh random --preset")
    ap.add_argument("--preset", default="tiny", help="rollout.config preset for the random model")
    ap.add_argument("--seed", type=int, default=0, help="the random model's init seed; request seeds follow it")
    ap.add_argument("--prompts", default="data/countdown/eval.jsonl", help="jsonl with a 'prompt' field per line")
    ap.add_argument("--num-prompts", type=int, default=num_prompts)
    ap.add_argument("--n", type=int, default=n, help="responses per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)


@contextmanager
def model_and_requests(args):
    """(model directory, requests) from `sampling_args`' options, within the block: --model, or a fresh random
    --preset saved to a temporary directory; exits with a one-line message for a missing file or directory."""
    path = Path(args.prompts)
    if not path.is_file():
        sys.exit(f"--prompts {path}: no such file (python -m rewards.countdown data/countdown writes the default)")
    lines = path.read_text().splitlines()[:args.num_prompts]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            model_dir = tmp
            save_model(*starting_model(ModelConfig(preset=args.preset, seed=args.seed)), tmp)
        elif not Path(model_dir).is_dir():
            sys.exit(f"--model {model_dir}: not a directory")
        tok = load_tokenizer(model_dir)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                stop_token_ids=(tok.eos_token_id,))
        yield model_dir, [Request(tok(json.loads(line)["prompt"])["input_ids"], n=args.n, seed=args.seed + i,
                                  params=params) for i, line in enumerate(lines)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sampling_args(ap, num_prompts=128, n=8, max_new_tokens=16)
    ap.add_argument("--body-dtype", choices=list(DTYPES), default="bf16", help="the rollout workers' weight dtype")
    ap.add_argument("--out", type=Path, default=Path("runs/fp32_head.png"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with model_and_requests(args) as (model_dir, requests):
        logprobs = measure(model_dir, requests, DTYPES[args.body_dtype])
    stats = {name: agreement(lp["rollout"], lp["trainer"]) for name, lp in logprobs.items()}
    model = args.model or f"random {args.preset} (seed {args.seed})"
    plot(logprobs, stats, args.out, f"{model}: rollout vs trainer token probabilities", args.body_dtype)
    print(json.dumps({"model": model, "body_dtype": args.body_dtype, "prompts": len(requests), "n": args.n,
                      "max_new_tokens": args.max_new_tokens, "threads": args.threads, **stats,
                      "plot": str(args.out), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
