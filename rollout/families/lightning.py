"""Lightning attention: MiniMax-Text-01 / M1, seven lightning layers per softmax layer.

A lightning layer keeps KᵀV [rows, heads, d, d] with a constant per-head decay and no convolution.
MiniMax's modeling code does not use the generic linear-attention cache calls: it insists on a
`MiniMaxCache` and calls `get_linear_cache` / `set_linear_cache`, so this adapter's cache is both a
`MiniMaxCache` and a `StateCache` and maps those two calls onto the layer's recurrent slot. Its
length comes from the first softmax layer, which also fixes upstream MiniMaxCache reporting 0 when
layer 0 is linear (docs/notes.md#model).
"""
from transformers.cache_utils import Cache
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from rollout.families import Family
from rollout.states import StateCache


class LightningCache(StateCache, MiniMaxCache):
    __len__ = Cache.__len__  # MiniMaxCache's counts its own `linear_cache` list, which this cache does not have

    def get_linear_cache(self, layer_idx: int):
        slot = self.layers[layer_idx]
        return slot.recurrent_states[0] if slot.has_previous_state[0] else None

    def set_linear_cache(self, layer_idx: int, state) -> None:
        slot = self.layers[layer_idx]
        slot.recurrent_states[0], slot.has_previous_state[0] = state, True
        slot.is_recurrent_states_initialized[0] = True


FAMILY = Family("lightning", ("minimax",), state="KᵀV [heads, d, d], constant per-head decay, no conv",
                state_modules=("MiniMaxLightningAttention",), moe_blocks=("MiniMaxSparseMoeBlock",),
                cache_class=LightningCache)
