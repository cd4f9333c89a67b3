"""Runner: tensors in, next-token logits out, for Llama-family decoders (Llama, SmolLM, Qwen2, and
Qwen3 with its per-head q/k norms), over a preallocated key/value cache in sequence slots, on CPU or
one CUDA GPU.

Why not the Hugging Face forward: at decode time (one token per row, batch 32-128, a 135M model on
CPU) its per-step cost is bookkeeping, not arithmetic: a `DynamicCache` that concatenates every
layer's keys each step, a scaled-dot-product attention kernel that is 5x slower than two batched
matmuls for a single query on CPU in bf16, and dozens of small ops per layer. This runner keeps:

  weights  its own copies in the sampling dtype (bf16 by default on CPUs with bf16 units), q/k/v and
           gate/up fused into one matmul each, refreshed from the learner's float32 weights by `sync`
           (LoRA adapters merged in), which the engine times;
  cache    K and V as [layers, slots, kv_heads, capacity, head_dim] tensors (bf16 with the compiled
           kernels and bf16 weights, else float32), allocated once and reused across calls
           (reallocated when a call needs more, or far less); slot s holds one sequence from
           position 0, so a decode step attends to a plain view of the first B slots, no copies;
  math     residual stream and attention in float32, matmuls in the weight dtype. A decode step
           (one new token per row) runs its small operations in `decode_kernels.cpp` (built by
           kernels.py): rotary + cache write + attention in one pass over the cache, residual add +
           RMSNorm, silu(gate) * up. Prefills, and every step where the kernels cannot be built, run
           the same formulas in PyTorch ops: grouped-query attention as q [B, kv, group, d] x
           K [B, kv, T, d], the row's causal mask built once per step. On CUDA the cache is in the
           weights' dtype and attention is PyTorch's scaled_dot_product_attention over the same
           layout (queries of one kv head stacked, so grouped-query attention needs no copies).

Measured on 2 cores (AVX-512 BF16), embedded model, batch 32, 64 new tokens: a decode step took
33-35 ms in PyTorch ops (matmuls ~15 ms, the attention's batched matmuls ~8 ms over the float32
cache, ~5 ms of small elementwise ops, ~3 ms sampling) and 20.5-21 ms with the kernels and the bf16
cache (attention ~2 ms, norms, SwiGLU and sampling ~1.5 ms).

`forward(slots, ids, starts, lengths)` runs new tokens of several rows at once (a prefill of prompts
after their cached prefix, or one decode token per row) and writes their keys and values into the
slots; positions are `starts + i`, so every row's rotary positions are those of running it alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forkrl.rollout.engine.kernels import decode_kernel

SUPPORTED = ("llama", "qwen2", "qwen3")


def resolve_dtype(name: str | None, model) -> torch.dtype:
    """The sampling dtype for `rollout.engine_dtype`: None / "model" = the model's own; "auto" =
    bfloat16 on a GPU or on a CPU with native bf16 units (AVX-512 BF16 / AMX) for models of at least
    10M parameters, else the model's. Below that size a decode step is all overhead, so bf16 would
    only add rounding (the tests' tiny random model is one such)."""
    own = next(model.parameters()).dtype
    if name in (None, "model"):
        return own
    if name == "auto":
        if sum(p.numel() for p in model.parameters()) < 10_000_000:
            return own
        device = next(model.parameters()).device
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else own
        return torch.bfloat16 if _cpu_has_bf16() else own
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"engine dtype must be one of auto, model, {', '.join(dtypes)}; got {name!r}")
    return dtypes[name]


def _cpu_has_bf16() -> bool:
    """Native bf16 arithmetic (AVX-512 BF16 or AMX). oneDNN also runs bf16 on plain AVX-512 by
    emulation, which is slower than float32, so its own "supported" flag is not the test."""
    try:
        from torch import cpu
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def unsupported_reason(model) -> str | None:
    """Why `DecoderRunner` cannot run this model, or None when it can."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        return f"model_type {kind!r} (fast path supports {', '.join(SUPPORTED)})"
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "no decoder layers / rotary embedding where a Llama model has them"
    return None


def _prepack_works() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=torch.bfloat16), 8)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=torch.bfloat16), w, None, "none", [], "")
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and float(out[0, 0]) == 8.0
    except (AttributeError, RuntimeError):
        return False


def _weight(linear) -> torch.Tensor:
    """A linear layer's effective weight: peft LoRA adapters (active, not merged) added to the base."""
    if hasattr(linear, "base_layer"):
        w = linear.base_layer.weight.detach()
        if not getattr(linear, "merged", False) and not getattr(linear, "disable_adapters", False):
            for name in getattr(linear, "active_adapters", []):
                if name in getattr(linear, "lora_A", {}):
                    w = w + linear.get_delta_weight(name).to(w.dtype)
        return w
    return linear.weight.detach()


def _copy_into(old, new):
    """`new`'s values in `old`'s tensors (same nesting of tuples and lists), so that their addresses,
    which CUDA graphs hold, stay valid."""
    if isinstance(new, torch.Tensor):
        if old is not new:
            old.copy_(new)
        return old
    if isinstance(new, (list, tuple)):
        return type(new)(_copy_into(o, n) for o, n in zip(old, new))
    return new


def _bias(linear) -> torch.Tensor | None:
    b = getattr(linear, "base_layer", linear).bias
    return None if b is None else b.detach()


GRAPH_KEY_BLOCK = 256   # decode graphs attend to keys in multiples of this many positions


@dataclass
class SharedKeys:
    """Where a decode step's rows read their leading keys (`DecoderRunner.decode`): row u reads keys
    [end[u, s-1], end[u, s]) from slot slot[u, s] (-1: no more segments), the rest from its own slot;
    rows are attended in `order`. int64 tensors, [U, S], [U, S] and [U]."""
    slot: torch.Tensor
    end: torch.Tensor
    order: torch.Tensor


@dataclass
class _DecodeGraph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor      # [b] static inputs, written before each replay
    pos: torch.Tensor      # [b]
    logits: torch.Tensor   # [b, V] static output
    held: tuple = ()       # other inputs the graph reads: they must outlive it (freed memory gets reused)


class DecoderRunner:
    def __init__(self, model, dtype: torch.dtype, compiled: bool = True, cuda_graphs: bool = True):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the fast engine cannot run this model: {reason}; use rollout.engine=hf")
        self.model = model
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = self.base.config
        self.dtype = dtype
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.n_heads // self.n_kv
        self.eps = cfg.rms_norm_eps
        self.rotary = self.base.model.rotary_emb
        self.device = next(model.parameters()).device
        # oneDNN's prepacked bf16 weights (what inductor's freezing uses): 1.1-1.3x faster matmuls at
        # decode batch sizes on CPU, same results; re-packed at every sync (~0.1 s for 135M weights)
        self.prepacked = self.device.type == "cpu" and dtype == torch.bfloat16 and _prepack_works()
        # the compiled decode kernels (kernels.py), with a bf16 cache when the weights are bf16 (the
        # attention streams the cache: half the bytes, ~1.4x faster). None (or compiled=False): the
        # PyTorch ops below, same formulas, float32 cache
        self.kernel = (decode_kernel() if compiled and self.device.type == "cpu" and self.head_dim in (16, 32, 64, 128)
                       and dtype in (torch.float32, torch.bfloat16) and self.group <= 16 else None)
        if self.device.type == "cuda":
            self.cache_dtype = dtype     # SDPA reads the cache in the matmul dtype
        else:
            self.cache_dtype = torch.bfloat16 if self.kernel is not None and dtype == torch.bfloat16 else torch.float32
        self.qk_norm = hasattr(self.base.model.layers[0].self_attn, "q_norm")   # Qwen3
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.sdpa = self.device.type == "cuda"    # attention through scaled_dot_product_attention
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self.k = self.v = torch.empty(0)
        self.layers: list[tuple] = []
        self.last_sync_seconds = self.sync()

    @torch.no_grad()
    def sync(self) -> float:
        """Copy the model's current weights into the runner's dtype; returns seconds taken."""
        start = time.perf_counter()
        dt = self.dtype
        inner = self.base.model
        layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            # the attention's 1/sqrt(d) goes into the query rows (rotary is linear, so it commutes)
            # (with Qwen3's q norm, into the norm's weight instead: the norm would undo it)
            scale = self.head_dim ** -0.5
            q_scale = 1.0 if self.qk_norm else scale
            qkv = torch.cat([_weight(at.q_proj) * q_scale, _weight(at.k_proj), _weight(at.v_proj)]).to(dt)
            biases = [_bias(at.q_proj), _bias(at.k_proj), _bias(at.v_proj)]
            qkv_bias = torch.cat([biases[0] * q_scale, *biases[1:]]).float() if biases[0] is not None else None
            qk_norms = ((at.q_norm.weight.detach().float() * scale, at.k_norm.weight.detach().float())
                        if self.qk_norm else None)
            gate_up = torch.cat([_weight(mlp.gate_proj), _weight(mlp.up_proj)]).to(dt)
            layers.append((layer.input_layernorm.weight.detach().float(), self._pack(qkv), qkv_bias, qk_norms,
                           self._pack(_weight(at.o_proj).to(dt)), layer.post_attention_layernorm.weight.detach().float(),
                           self._pack(gate_up), self._pack(_weight(mlp.down_proj).to(dt))))
        head = self.base.get_output_embeddings()
        state = (layers, inner.norm.weight.detach().float(), inner.embed_tokens.weight.detach(),
                 self._pack(_weight(head).to(dt)), _bias(head))
        if self._graphs:   # captured graphs read the old tensors: refresh them in place
            state = _copy_into(self._state, state)
        self._state = state
        self.layers, self.final_norm, self.embed, self.head, self.head_bias = state
        return time.perf_counter() - start

    @property
    def reads_shared_keys(self) -> bool:
        """Whether `decode` uses `shared` (the compiled CPU attention; CUDA graphs and the PyTorch
        path read each row's own slot)."""
        return self.kernel is not None and not self.use_graphs

    def _pack(self, w: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(w, 64) if self.prepacked else w

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.prepacked:
            return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        return F.linear(x, w)

    # -- cache -------------------------------------------------------------------------------------
    def reserve(self, slots: int, capacity: int, keep: bool = False) -> None:
        """Make room for `slots` sequences of up to `capacity` tokens; with `keep` the buffers only
        grow and keep their contents (a stream whose running sequences stay), else contents are lost.

        Without `keep`, a buffer much longer than needed is replaced too: a decode step reads
        K[:B, :, :T], and with rows `capacity` apart instead of T, the attention matmuls run ~1.7x
        slower (measured on CPU)."""
        old = None
        if self.k.dim() == 5:
            _, have_slots, _, have_cap, _ = self.k.shape
            if slots <= have_slots and capacity <= have_cap and (keep or have_cap <= 2 * capacity + 64):
                return
            if keep:
                old = (self.k, self.v)
                slots, capacity = max(slots, have_slots), max(capacity, have_cap)
        shape = (self.n_layers, slots, self.n_kv, capacity, self.head_dim)
        self._graphs.clear()    # they read the old buffers
        self.k = self.v = None  # free the old buffers before allocating new ones
        # zeros, not empty: masked positions still enter the matmul (0 x NaN would poison it). A bf16
        # cache only with the compiled attention: the PyTorch path's batched matmuls ran slower on it
        self.k = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
        if old is not None:
            s, c = old[0].shape[1], old[0].shape[3]
            self.k[:, :s, :, :c] = old[0]
            self.v[:, :s, :, :c] = old[1]

    def read(self, slot: int, length: int) -> torch.Tensor:
        """States of a slot's first `length` tokens as [layers, 2, kv_heads, length, head_dim]."""
        return torch.stack([self.k[:, slot, :, :length], self.v[:, slot, :, :length]], dim=1)

    def write(self, slot: int, kv: torch.Tensor) -> None:
        n = kv.shape[3]
        self.k[:, slot, :, :n] = kv[:, 0]
        self.v[:, slot, :, :n] = kv[:, 1]

    def copy(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    # -- forward -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, slots: torch.Tensor, ids: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor
                ) -> torch.Tensor:
        """Run `ids` [U, S] (row u's first lengths[u] entries are real; the rest padding) at positions
        starts[u] + i of slots[u], after the starts[u] tokens already in that slot. Writes their keys
        and values; returns the next-token logits after each row's last real token, [U, V] float32."""
        U = ids.shape[0]
        contiguous = bool((slots == torch.arange(U, device=ids.device)).all())
        return self._forward(slots, ids, starts, lengths, contiguous, int((starts + lengths).max()))

    def _forward(self, slots, ids, starts, lengths, contiguous: bool, T: int, shared: SharedKeys | None = None
                 ) -> torch.Tensor:
        """`forward` with the layout known: keys 0..T-1 are attended. With one token per row on CUDA
        it makes no host synchronisation, so a CUDA graph can capture it. `shared`: see `decode`."""
        U, S = ids.shape
        pos = starts.unsqueeze(1) + torch.arange(S, device=ids.device)               # [U, S]
        x = self.embed[ids].float()                                                 # [U, S, D]
        cos, sin = self.rotary(x, pos)                                              # [U, S, d]
        if self.kernel is not None and S == 1 and contiguous:
            attend = self._compiled_attention(pos, cos, sin, shared)
        else:
            attend = self._torch_attention(slots, lengths, pos, cos, sin, contiguous, T)
        h = self._add_norm(x, None, self.layers[0][0])
        for li, (_, qkv_w, qkv_b, qk_norms, o_w, n2, gu_w, down_w) in enumerate(self.layers):
            qkv = self._linear(h, qkv_w)
            if qk_norms is not None:
                qkv, qkv_b = self._qk_norm(qkv, qkv_b, *qk_norms), None
            h = self._add_norm(x, self._linear(attend(li, qkv, qkv_b), o_w), n2)
            down = self._linear(self._silu_mul(self._linear(h, gu_w)), down_w)
            if li + 1 < len(self.layers):
                h = self._add_norm(x, down, self.layers[li + 1][0])
        if S == 1:
            h = self._add_norm(x, down, self.final_norm).view(U, -1)
        else:
            x.add_(down)
            h = self._add_norm(x[torch.arange(U, device=ids.device), lengths - 1], None, self.final_norm)
        logits = self._linear(h, self.head).float()
        return logits if self.head_bias is None else logits + self.head_bias

    # -- decode: one token per row in slots 0..U-1; on CUDA, replayed CUDA graphs --------------------
    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, starts: torch.Tensor, shared: SharedKeys | None = None) -> torch.Tensor:
        """Logits after feeding ids[u] at position starts[u] of slot u, for u < U: [U, V] float32.

        `shared`: rows whose leading keys other slots hold too (the same prompt, a tree's common
        prefix) read them there, so the compiled attention streams a shared prefix from memory once
        for all its rows instead of once per row; other paths read every row's own slot (the same
        values: a slot's prefix is a copy of the states it shares).

        On CUDA with `cuda_graphs`, a decode step is hundreds of small kernels whose launches cost more
        than their arithmetic at these batch sizes, so each (batch bucket, key-length bucket) is
        captured once as a CUDA graph and replayed: the batch is padded to the next bucket (padding
        rows write to the never-used last cache position of free slots) and attention reads the keys
        up to the next multiple of `GRAPH_KEY_BLOCK`, masked past each row's position."""
        U = ids.shape[0]
        if not self.use_graphs:
            return self._forward(torch.arange(U, device=ids.device), ids.view(U, 1), starts, torch.ones_like(starts),
                                 True, int(starts.max()) + 1, shared)
        slots, capacity = self.k.shape[1], self.k.shape[3]
        b = next(n for n in self._buckets(slots) if n >= U)
        T = min(capacity, -(-(int(starts.max()) + 1) // GRAPH_KEY_BLOCK) * GRAPH_KEY_BLOCK)
        graph = self._graphs.get((b, T)) or self._capture(b, T)
        graph.ids[:U].copy_(ids)
        graph.ids[U:].zero_()
        graph.pos[:U].copy_(starts)
        graph.pos[U:].fill_(capacity - 1)
        graph.graph.replay()
        return graph.logits[:U].clone()

    @staticmethod
    def _buckets(slots: int) -> list[int]:
        return sorted({min(2 ** i, slots) for i in range(slots.bit_length() + 1)})

    def _capture(self, b: int, T: int) -> _DecodeGraph:
        ids = torch.zeros(b, dtype=torch.long, device=self.device)
        pos = torch.full((b,), self.k.shape[3] - 1, dtype=torch.long, device=self.device)  # a never-used position
        rows = torch.arange(b, device=self.device)
        ones = torch.ones(b, dtype=torch.long, device=self.device)

        def step():
            return self._forward(rows, ids.view(b, 1), pos, ones, True, T)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):   # warm-up outside the graph (allocator, library handles)
                step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step()
        self._graphs[(b, T)] = captured = _DecodeGraph(graph, ids, pos, logits, held=(rows, ones))
        return captured

    def _qk_norm(self, qkv: torch.Tensor, qkv_b: torch.Tensor | None, q_w: torch.Tensor, k_w: torch.Tensor
                 ) -> torch.Tensor:
        """Qwen3: RMSNorm over each query and key head (bias first), before the rotary embedding; the
        attention's 1/sqrt(d) is in q_w. Float32, contiguous, as the attention paths take it."""
        H, KV, d = self.n_heads, self.n_kv, self.head_dim
        qkv = qkv.float()
        if qkv_b is not None:
            qkv = qkv + qkv_b
        lead = qkv.shape[:-1]
        q = F.rms_norm(qkv[..., :H * d].reshape(*lead, H, d), (d,), q_w, self.eps)
        k = F.rms_norm(qkv[..., H * d:(H + KV) * d].reshape(*lead, KV, d), (d,), k_w, self.eps)
        return torch.cat([q.reshape(*lead, H * d), k.reshape(*lead, KV * d), qkv[..., (H + KV) * d:]], dim=-1)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """x += delta (in place; the residual stream), then RMSNorm(x) * weight in the matmul dtype."""
        if self.kernel is not None:
            return self.kernel.add_rms_norm(x, delta, weight, self.eps, self.dtype)
        if delta is not None:
            x.add_(delta)
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps).to(self.dtype)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _compiled_attention(self, pos, cos, sin, shared: SharedKeys | None = None):
        """One new token per row in slots 0..U-1: `decode_kernels.cpp` applies the rotary embedding,
        writes the keys and values and attends, in one pass over the cache."""
        U, d, H = pos.shape[0], self.head_dim, self.n_heads
        cos, sin, pos = cos.reshape(U, d).contiguous(), sin.reshape(U, d).contiguous(), pos.reshape(U).contiguous()
        seg = (shared.slot, shared.end, shared.order) if shared is not None else (None, None, None)

        def attend(li, qkv, qkv_b):
            return self.kernel.decode_attention(qkv.view(U, -1), qkv_b, cos, sin, pos, self.k[li], self.v[li],
                                                H, *seg).view(U, 1, H * d)
        return attend

    def _torch_attention(self, slots, lengths, pos, cos, sin, contiguous, T):
        """The same attention in PyTorch ops, for any rows and any number of new tokens per row."""
        U, S = pos.shape
        H, KV, G, d = self.n_heads, self.n_kv, self.group, self.head_dim
        dev, half = pos.device, d // 2
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)                               # [U, S, 1, d]
        # query i of row u (at position pos[u, i]) sees keys 0..pos[u, i] of its own slot
        hidden = torch.arange(T, device=dev).view(1, 1, T) > pos.unsqueeze(-1)      # [U, S, T]
        sdpa = self.sdpa
        if sdpa:   # visible keys for queries ordered (group, position), as q below
            visible = ~(hidden if S == 1 else hidden.repeat(1, G, 1)).unsqueeze(1)  # [U, 1, G*S or 1, T]
        else:
            bias = torch.zeros(hidden.shape, device=dev).masked_fill_(hidden, float("-inf")).view(U, 1, 1, S, T)
        # where the new keys/values go: every (row, i) with i < lengths[row] (all of them when decoding)
        ragged = S > 1 and bool((lengths < S).any())
        real = (torch.arange(S, device=dev) < lengths.unsqueeze(1)).flatten().nonzero().squeeze(1) if ragged else None
        w_slot = slots.unsqueeze(1).expand(U, S).flatten()
        w_pos = pos.flatten()
        if ragged:
            w_slot, w_pos = w_slot[real], w_pos[real]

        def attend(li, qkv, qkv_b):
            qkv = qkv.float()
            if qkv_b is not None:
                qkv = qkv + qkv_b
            qk = qkv[..., :(H + KV) * d].view(U, S, H + KV, d)
            rotated = torch.cat([-qk[..., half:], qk[..., :half]], dim=-1)
            qk = torch.addcmul(qk * cos, rotated, sin)                              # rotary
            k = qk[:, :, H:].reshape(U * S, KV, d)
            v = qkv[..., (H + KV) * d:].reshape(U * S, KV, d)
            if ragged:
                k, v = k[real], v[real]
            K, V = self.k[li], self.v[li]
            K[w_slot, :, w_pos] = k.to(K.dtype)
            V[w_slot, :, w_pos] = v.to(V.dtype)
            if contiguous:
                Kr, Vr = K[:U, :, :T], V[:U, :, :T]
            else:
                Kr, Vr = K[slots, :, :T], V[slots, :, :T]
            # query head h reads kv head h // G (Hugging Face's repeat_kv order); the 1/sqrt(d) scale
            # is folded into the query weights at sync
            q = qk[:, :, :H].reshape(U, S, KV, G, d).permute(0, 2, 3, 1, 4).reshape(U, KV, G * S, d)
            if sdpa:
                att = F.scaled_dot_product_attention(q.to(Kr.dtype), Kr, Vr, attn_mask=visible, scale=1.0)
            else:
                Kr, Vr = Kr.float(), Vr.float()
                scores = torch.matmul(q, Kr.transpose(-1, -2))                      # [U, KV, G*S, T]
                scores.view(U, KV, G, S, T).add_(bias)
                att = torch.matmul(torch.softmax(scores, dim=-1), Vr)               # [U, KV, G*S, d]
            return att.view(U, KV, G, S, d).permute(0, 3, 1, 2, 4).reshape(U, S, H * d).to(self.dtype)
        return attend
