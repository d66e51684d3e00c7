"""Per-layer state slots, and the one cache the engine runs every model family on.

Each layer of a hybrid holds one kind of state, whatever the family:
- `KVSlot`: a softmax layer's keys and values [rows, kv_heads, T, d], growing with the sequence;
- `RecurrentSlot`: a linear-state layer's O(1) state: a matrix state (lightning [rows, heads, d, d],
  Gated DeltaNet / KDA [rows, heads, d_k, d_v], Mamba2 [rows, heads, d_head, d_state]) and, beside it
  for GDN, KDA and Mamba2, a short-convolution state [rows, channels, width] (width 4).
Both are transformers cache layers, so the models read and write them through their own cache calls.
`StateCache` holds one slot per layer and gives the engine the operations it needs for every family:
a fresh cache is prefilled once (left-padded), then `select` forks each prompt's row to its n samples
and drops finished rows, and `extend` admits newly prefilled rows beside running ones. Rows are
sequences; softmax rows are left-padded to one length, recurrent rows need no padding.
`KeptStates` holds sessions' one-row caches between their turns (multi-turn episodes).
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from transformers.cache_utils import DummyLayer, DynamicCache, DynamicLayer, LinearAttentionLayer


class KVSlot(DynamicLayer):
    """A softmax layer's KV that writes into spare capacity instead of concatenating.

    Upstream `DynamicLayer.update` concatenates, copying the whole KV for every decoded token, so a
    softmax layer's per-token cost grows with context; here a copy happens once per 25% of growth.
    `keys`/`values` stay views of the stores, so upstream code reading them is unchanged.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.set(key_states[..., :0, :], value_states[..., :0, :])
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.key_store.shape[-2]:
            self.set(self.keys, self.values, room=key_states.shape[-2])
        self.key_store[..., start:end, :] = key_states
        self.value_store[..., start:end, :] = value_states
        self.keys, self.values = self.key_store[..., :end, :], self.value_store[..., :end, :]
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor, room: int = 0) -> None:
        """Replace the contents with `keys`/`values` [B, heads, T, d], keeping spare capacity after them."""
        length = keys.shape[-2]
        capacity = length + room + max(length // 4, 256)
        self.key_store = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        self.value_store = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        self.key_store[..., :length, :] = keys
        self.value_store[..., :length, :] = values
        self.keys, self.values = self.key_store[..., :length, :], self.value_store[..., :length, :]

    def select(self, rows: torch.Tensor, drop_left: int = 0) -> None:
        """Keep batch `rows` (repeats fork a row) and drop the first `drop_left` positions."""
        if self.is_initialized:
            self.set(self.keys[rows, :, drop_left:], self.values[rows, :, drop_left:])

    def extend(self, other: KVSlot, pads: tuple[int, int]) -> None:
        """Append `other`'s rows after ours, left-padding ours by pads[0] positions and theirs by pads[1]."""
        if self.is_initialized:
            self.set(*(torch.cat([F.pad(a, (0, 0, pads[0], 0)), F.pad(b, (0, 0, pads[1], 0))])
                       for a, b in ((self.keys, other.keys), (self.values, other.values))))


class RecurrentSlot(LinearAttentionLayer):
    """A linear-state layer: `recurrent_states[0]` (the matrix state) and, where the family has a short
    convolution, `conv_states[0]` (its last `width` inputs). Both are [rows, ...]; forking copies both."""

    def select(self, rows: torch.Tensor, drop_left: int = 0) -> None:
        """Keep batch `rows` (repeats fork a row); `drop_left` is for softmax slots and means nothing here."""
        for states in (self.conv_states, self.recurrent_states):
            states.update({i: s[rows] for i, s in states.items() if s is not None})

    def extend(self, other: RecurrentSlot, pads: tuple[int, int]) -> None:
        """Append `other`'s rows after ours; a recurrent state has no positions to pad."""
        for mine, theirs in ((self.conv_states, other.conv_states), (self.recurrent_states, other.recurrent_states)):
            mine.update({i: torch.cat([s, theirs[i]]) for i, s in mine.items() if s is not None})


SLOTS = {"full_attention": KVSlot, "linear_attention": RecurrentSlot, "dummy": DummyLayer}


class StateCache(DynamicCache):
    """One slot per model layer, built from the layer kinds a family adapter reads off the config.

    `kinds[i]` is "full_attention" (softmax KV), "linear_attention" (recurrent state) or "dummy"
    (a layer with no state, such as Nemotron-H's MLP and MoE layers). Upstream `Cache` reads length
    and mask sizes from the first softmax layer, since recurrent slots are not `CacheLayerMixin`s.
    """

    def __init__(self, kinds: list[str]):
        super().__init__()  # a lazy DynamicCache; its layers are replaced by the slots below
        self.layers = [SLOTS[kind]() for kind in kinds]
        self.layer_class_to_replicate = None

    def slots(self):
        return [s for s in self.layers if not isinstance(s, DummyLayer)]

    def select(self, rows: torch.Tensor, drop_left: int = 0) -> None:
        """Keep batch `rows` (a row repeated n times is forked to n rows, every state copied) and drop the
        first `drop_left` softmax positions (padding that every kept row has)."""
        for slot in self.slots():
            slot.select(rows, drop_left)

    def take(self, rows: torch.Tensor, drop_left: int = 0) -> StateCache:
        """A new cache of the same class holding copies of batch `rows`' states, without their first
        `drop_left` softmax positions; this cache is unchanged."""
        new = copy.copy(self)
        new.layers = [copy.copy(slot) for slot in self.layers]
        for slot in new.slots():  # the recurrent slots' per-state dicts are shared by a shallow copy
            slot.__dict__.update({k: dict(v) for k, v in vars(slot).items() if isinstance(v, dict)})
        new.select(rows, drop_left)
        return new

    def extend(self, other: StateCache) -> tuple[int, int]:
        """Append `other`'s rows after ours. The shorter side's KV is left-padded so that both end at
        the same position; returns the padding added to (ours, theirs), for the attention masks."""
        length = max(self.get_seq_length(), other.get_seq_length())
        pads = length - self.get_seq_length(), length - other.get_seq_length()
        for mine, theirs in zip(self.slots(), other.slots()):
            mine.extend(theirs, pads)
        return pads

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)


class KeptStates:
    """Sessions' states kept between their turns: session id -> (the tokens whose state it is, a one-row
    `StateCache` without padding). A session's next request that starts with those tokens prefills only
    what follows them (rollout.engine).

    At most `limit` sessions are kept; keeping one more evicts the least recently kept, counted in
    `evictions` (that session's next turn re-prefills its whole history). `limit` 0 keeps none.
    """

    def __init__(self, limit: int):
        self.limit, self.evictions = limit, 0
        self.states: OrderedDict[int, tuple[list[int], StateCache]] = OrderedDict()

    def keep(self, session: int, tokens: list[int], cache: StateCache) -> None:
        self.states.pop(session, None)
        self.states[session] = (tokens, cache)
        while len(self.states) > self.limit:
            self.states.popitem(last=False)
            self.evictions += 1

    def take(self, session: int | None, prompt_ids: list[int]) -> tuple[list[int], StateCache] | None:
        """The session's kept (tokens, cache), removed from the store, when `prompt_ids` extends those tokens
        by at least one; None otherwise (nothing kept, or a history that differs: then it is dropped)."""
        kept = self.states.pop(session, None) if session is not None else None
        if kept and len(kept[0]) < len(prompt_ids) and prompt_ids[:len(kept[0])] == kept[0]:
            return kept
        return None

    def clear(self) -> None:
        """Forget every session (new weights: kept states were computed by the old ones)."""
        self.states.clear()
