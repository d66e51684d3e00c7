"""Minibatches of whole groups, length-bucketed micro-batches, and the weights that make them sum exactly."""
import torch

from cispo.batching import MIN_FILL, assign, minibatches, pad_rows, shard
from cispo.sections import TrainerConfig
from cispo.loss import normalize


def test_minibatches_keep_groups_whole_and_cover_every_row_once():
    group_index = torch.arange(10).repeat_interleave(3)
    parts = minibatches(group_index, updates=4, seed=1)
    assert len(parts) == 4
    assert sorted(torch.cat(parts).tolist()) == list(range(30))
    for rows in parts:
        for g in group_index[rows].unique():
            assert (group_index[rows] == g).sum() == 3
    assert [p.tolist() for p in parts] == [p.tolist() for p in minibatches(group_index, 4, seed=1)]
    assert [p.tolist() for p in parts] != [p.tolist() for p in minibatches(group_index, 4, seed=2)]
    assert len(minibatches(group_index, updates=16, seed=1)) == 10  # no more updates than groups


def test_bucketing_respects_budgets_balances_ranks_and_pads_less():
    torch.manual_seed(0)
    lengths = (torch.distributions.LogNormal(5, 1).sample((200,)).clamp(8, 4000)).int().tolist()
    cfg = TrainerConfig(micro_batch_size=16, micro_batch_tokens=4096)
    plan = assign(lengths, 2, cfg)
    assert len(plan[0]) == len(plan[1])  # every rank runs as many backwards
    flat = [i for rank in plan for micro in rank for i in micro]
    assert sorted(flat) == list(range(200))
    for rank in plan:
        for micro in filter(None, rank):  # empty: a stand-in slot (checked below by count)
            assert len(micro) <= 16
            assert len(micro) == 1 or len(micro) * max(lengths[i] for i in micro) <= 4096
            assert min(lengths[i] for i in micro) >= MIN_FILL * max(lengths[i] for i in micro)  # padding <= 1/3
    loads = [sum(lengths[i] for m in rank for i in m) for rank in plan]
    assert abs(loads[0] - loads[1]) <= max(lengths)

    def padded(p):
        return sum(len(m) * max(lengths[i] for i in m) for rank in p for m in rank if m)
    naive = assign(lengths, 2, TrainerConfig(micro_batch_size=16, length_bucketing=False))
    assert padded(plan) < 0.5 * padded(naive)


def test_shard_weights_sum_to_the_whole_minibatch_loss():
    torch.manual_seed(0)
    rows = [(list(range(3)), list(range(int(n)))) for n in torch.randint(1, 30, (12,))]
    batch = pad_rows(rows, filler_id=0)
    batch.group_index = torch.arange(4).repeat_interleave(3)
    per_token = batch.old_logprobs = torch.randn_like(batch.loss_mask)  # a per-token value riding along
    for norm in ("group", "token", "sequence", "sample_token"):
        whole = normalize(per_token, batch.loss_mask, norm, batch.group_index)
        plan, counts = shard(batch, torch.arange(12), norm, 3, TrainerConfig(micro_batch_tokens=40))
        assert len({len(rank) for rank in plan}) == 1 and sum(len(r) for r in plan) > 3
        total = sum((mb.old_logprobs * mb.weights).sum() for rank in plan for mb in rank)
        assert torch.allclose(total, whole, rtol=1e-6), norm
        assert counts["real_tokens"] == int(batch.lengths.sum())
        for rank in plan:
            for mb in rank:
                assert mb.input_ids.shape[1] == mb.weights.shape[1] + 1 == mb.loss_mask.shape[1] + 1
