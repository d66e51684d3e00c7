"""From one generation batch to what each trainer rank runs: off-policy minibatches of whole prompt
groups (M1 §3.1), each split over ranks and into length-bucketed micro-batches.

Rows are right-padded [prompt + response] token rows. A micro-batch pads only to its own longest
row, so sorting by length before cutting keeps padding low on long-tailed lengths. (Packing several
rows into one would need the lightning-attention state reset at row boundaries, which the HF model
does not do.)
"""
from __future__ import annotations

import torch

from cispo.config import TrainerConfig
from cispo.loss import token_weights


# Bucketed, a row shorter than this share of its micro-batch's longest starts a new one, so no
# micro-batch is more than 1/3 padding. Measured (benchmarks/train_throughput.py): padding 0.148
# against 0.352 without the rule, 5217 against 4389 tokens/s, for 8 micro-batches instead of 3.
MIN_FILL = 2 / 3


def minibatches(group_index: torch.Tensor, updates: int, seed: int) -> list[torch.Tensor]:
    """Row indices of `updates` minibatches (fewer if there are fewer groups), whole groups in a seeded
    random order, so a group's normalization (Eq. 4) always sees the whole group."""
    groups = torch.unique(group_index)
    order = groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))]
    return [torch.nonzero(torch.isin(group_index, part)).squeeze(1) for part in order.chunk(min(updates, len(groups)))]


def assign(lengths: list[int], ranks: int, cfg: TrainerConfig) -> list[list[list[int]]]:
    """Positions into `lengths`, as [rank][micro-batch] lists.

    Bucketed: longest first, each row to the rank with the fewest tokens so far, then each rank's rows
    cut into micro-batches of at most `micro_batch_size` rows and `micro_batch_tokens` padded tokens
    (a row longer than that goes alone); a row under MIN_FILL of the longest starts a new one.
    Unbucketed (the baseline): arrival order, `micro_batch_size` rows at a time. Every rank gets the
    same number of micro-batches; a rank short of one gets an empty list, which the caller fills with
    a zero-weight row, because each backward is a collective.
    """
    if cfg.length_bucketing:
        per_rank, load = [[] for _ in range(ranks)], [0] * ranks
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            r = load.index(min(load))
            per_rank[r].append(i)
            load[r] += lengths[i]
    else:
        per_rank = [list(range(len(lengths)))[r::ranks] for r in range(ranks)]
    plan = []
    for rows in per_rank:
        micro = []
        for i in rows:
            # Bucketed rows come longest first, so a micro-batch's first row is its longest.
            fits = micro and len(micro[-1]) < cfg.micro_batch_size and (not cfg.length_bucketing or (
                (len(micro[-1]) + 1) * lengths[micro[-1][0]] <= cfg.micro_batch_tokens
                and lengths[i] >= MIN_FILL * lengths[micro[-1][0]]))
            if fits:
                micro[-1].append(i)
            else:
                micro.append([i])
        plan.append(micro)
    count = max(len(m) for m in plan)
    return [m + [[] for _ in range(count - len(m))] for m in plan]


def shard(batch: dict, rows: torch.Tensor, normalization: str, ranks: int, cfg: TrainerConfig) -> tuple[list[list[dict]], dict]:
    """One minibatch (`rows` of `batch`) as each rank's micro-batches, carrying the loss weights of the
    whole minibatch (cispo.loss.token_weights), plus its padded and real token counts.

    `batch` holds `input_ids` [B, T], `lengths` [B], per-token [B, T-1] tensors (`loss_mask`, ...),
    per-row [B] tensors (`advantages`) and optionally `group_index` [B]."""
    groups = batch["group_index"][rows] if "group_index" in batch else None
    weights = token_weights(batch["loss_mask"][rows], normalization, groups)
    lengths = batch["lengths"][rows].tolist()
    keys = [k for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in ("lengths", "group_index")]
    counts = {"padded_tokens": 0, "real_tokens": 0}
    out = []
    for micro in assign(lengths, ranks, cfg):
        mbs = []
        for pos in micro:
            # An empty slot gets a zero-weight 2-token stand-in: every rank runs as many backwards (collectives).
            width = max(lengths[p] for p in pos) if pos else 2
            mb = {k: batch[k][rows[pos or [0]]] for k in keys}
            mb = {k: v[:, :width] if k == "input_ids" else v[:, :width - 1] if v.dim() == 2 else v for k, v in mb.items()}
            mb["weights"] = weights[pos, :width - 1] if pos else torch.zeros(1, width - 1)
            if not pos:
                mb["loss_mask"] = torch.zeros_like(mb["loss_mask"])
            counts["padded_tokens"] += len(pos) * width
            counts["real_tokens"] += sum(lengths[p] for p in pos)
            mbs.append(mb)
        out.append(mbs)
    return out, counts


def pad_rows(rows: list[tuple[list[int], list[int]]], filler_id: int) -> dict:
    """[prompt + response] rows, right-padded (exact for a causal model): `input_ids`, `loss_mask` over
    the response targets, and `lengths`.

    Fill with a real token such as EOS, not the pad id: the pad embedding is all zeros, and zero rows
    gave NaN gradients in layer 0's lightning attention (measured on this model; grads finite otherwise).
    """
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), filler_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width - 1))
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        mask[i, len(p) - 1:len(p) + len(r) - 1] = 1
    return {"input_ids": ids, "loss_mask": mask, "lengths": torch.tensor([len(p) + len(r) for p, r in rows])}
