"""Span attention: the learner's packed rows attended span by span instead of as one dense square.

The learner's flat layout (`forward.pack_flat`) runs every distinct prefix of a batch once in one
row: a sequence's first tokens may sit in another sequence's columns (a shared prompt or few-shot
header, a tree branch's prefix) and only the rest are its own. Dense attention under a mask would
compute every (query, key) pair of the row, most of them masked. Here a span (a sequence's own
tokens) sees three blocks of keys:

    the row's header (every span):        key columns 0..H, seen entirely
    the prefix it continues (`borrowed`): another sequence's key columns, seen entirely
    its own tokens:                        key columns H+s..H+s+m, causal

On the CPU each block is one call of PyTorch's fused attention kernel without a mask, and the
blocks are merged by their log-sum-exp (the softmax over the union of the blocks), as flash
attention merges the key tiles it visits. The header block is one call for every query of the row:
one large product instead of one per span, and no span needs an explicit mask (the masked kernel
costs half again as much). Backward runs each block's kernel backward with the merged output and
log-sum-exp, which is exactly that block's share of the gradient. Elsewhere (or with attention
dropout) each span gathers its keys and runs one masked SDPA call.

The result equals the dense masked attention at every position (the flat row has no padding). It is
a transformers attention function (`AttentionInterface`), used when the forward passes `spans` (the
learner on the CPU, where attention costs as much as the linear layers at these lengths); without
`spans` it is the model's usual SDPA attention.

Two more keyword arguments carry a mini-batch's header (`forward.Header`: a prefix every sequence
starts with, run once for all micro-batches): `record`, a dict the header's own forward fills with
each layer's keys and values, and `header`, whose keys and values a micro-batch's forward puts
before its own, so key column j < len(header) is header token j and the row's columns follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SPAN_ATTENTION = "forkrl_spans"


@dataclass
class Span:
    """Queries `start..end` of the flat row. They see the row's header (if it has one), `borrowed`
    (the key columns of the prefix this sequence continues, in order; None when it continues none)
    entirely, and their own tokens causally."""
    start: int
    end: int
    borrowed: Tensor | None = None


# a block: queries q0..q1 see the key columns `cols` (a slice or an index tensor), entirely or causally
Block = tuple[int, int, "slice | Tensor", bool]


def blocks_of(spans: list[Span], header: int, C: int) -> list[Block]:
    """The key blocks of a row of C queries after a header of `header` key columns."""
    blocks: list[Block] = [(0, C, slice(0, header), False)] if header else []
    filled = 0
    for s in spans:
        if s.start != filled:
            raise ValueError(f"spans leave columns {filled}..{s.start} uncovered")
        if s.borrowed is not None and len(s.borrowed):
            blocks.append((s.start, s.end, s.borrowed, False))
        blocks.append((s.start, s.end, slice(header + s.start, header + s.end), True))
        filled = s.end
    if filled != C:
        raise ValueError(f"spans leave columns {filled}..{C} uncovered")
    return blocks


def _take(x: Tensor, cols) -> Tensor:
    return x[:, :, cols] if isinstance(cols, slice) else x.index_select(2, cols)


class _MergedBlocks(torch.autograd.Function):
    """softmax(q·kᵀ)·v over the union of key blocks, one fused CPU kernel call per block, merged by
    log-sum-exp: with L = log Σ_b exp(L_b), out = Σ_b exp(L_b - L) · out_b."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, blocks: list[Block], scale: float | None):
        out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        lse = torch.full(query.shape[:3], float("-inf"), dtype=torch.float32, device=query.device)
        for q0, q1, cols, causal in blocks:
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[:, :, q0:q1], _take(key, cols), _take(value, cols), 0.0, causal, scale=scale)[:2]
            seen = lse[:, :, q0:q1]
            merged = torch.logaddexp(seen, l)
            out[:, :, q0:q1] = (out[:, :, q0:q1] * (seen - merged).exp().unsqueeze(-1)
                                + o.float() * (l - merged).exp().unsqueeze(-1))
            lse[:, :, q0:q1] = merged
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.blocks, ctx.scale = blocks, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        query, key, value, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        dk = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
        dv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        for q0, q1, cols, causal in ctx.blocks:
            # the kernel recomputes this block's probabilities as exp(q·kᵀ - L) with the merged L, and
            # its softmax correction from rowsum(grad · out) with the merged out: the block's exact share
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad[:, :, q0:q1], query[:, :, q0:q1], _take(key, cols), _take(value, cols),
                out[:, :, q0:q1], lse[:, :, q0:q1].contiguous(), 0.0, causal, scale=ctx.scale)
            dq[:, :, q0:q1] += gq
            if isinstance(cols, slice):
                dk[:, :, cols] += gk
                dv[:, :, cols] += gv
            else:
                dk.index_add_(2, cols, gk.float())
                dv.index_add_(2, cols, gv.float())
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None


def _masked_spans(query: Tensor, key: Tensor, value: Tensor, blocks: list[Block], dropout: float,
                  scale: float | None) -> Tensor:
    """The same attention with one masked SDPA call per span over its gathered keys (any device)."""
    parts = []
    for q0, q1, cols, causal in blocks:
        if not causal:
            continue   # a span's entire blocks are gathered with its own (causal) one, which comes last
        seen = [c for a, b, c, causal_ in blocks if not causal_ and a <= q0 and q1 <= b]
        cols_all = torch.cat([torch.arange(c.start, c.stop) if isinstance(c, slice) else c.cpu() for c in seen]
                             + [torch.arange(cols.start, cols.stop)]).to(query.device)
        before, m = len(cols_all) - (q1 - q0), q1 - q0
        mask = torch.ones((m, before + m), dtype=torch.bool, device=query.device)
        mask[:, before:] = torch.ones((m, m), dtype=torch.bool, device=query.device).tril()
        parts.append(F.scaled_dot_product_attention(query[:, :, q0:q1], key.index_select(2, cols_all),
                                                    value.index_select(2, cols_all), attn_mask=mask,
                                                    dropout_p=dropout, scale=scale))
    return torch.cat(parts, dim=2)


def span_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                   dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                   spans: list[Span] | None = None, header=None, record: dict | None = None,
                   **kwargs) -> tuple[Tensor, None]:
    """query [1, H, C, D], key/value [1, Hkv, C, D] -> ([1, C, H, D], None), as transformers' SDPA.
    `spans` cover the row's columns in order. `record`: keep this layer's keys and values there
    (the first time: gradient checkpointing runs the layer again in backward). `header`: its keys
    and values come first."""
    if record is not None:
        record.setdefault(module.layer_idx, (key, value))
    if header is not None:   # (hidden_states passes one only with spans)
        key = torch.cat([header.keys[module.layer_idx].to(key.dtype), key], dim=2)
        value = torch.cat([header.values[module.layer_idx].to(value.dtype), value], dim=2)
    if spans is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    _, H, C, D = query.shape
    blocks = blocks_of(spans, key.shape[2] - C, C)
    groups = H // key.shape[1]
    if groups > 1:  # one copy for all blocks instead of one per block
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    if query.device.type == "cpu" and p == 0.0:
        # the kernel is called directly, so autocast's casting for SDPA is done here: one dtype for all
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        with torch.autocast("cpu", enabled=False):
            out = _MergedBlocks.apply(query.to(dtype), key.to(dtype), value.to(dtype), blocks, scaling)
    else:
        out = _masked_spans(query, key, value, blocks, p, scaling)
    return out.transpose(1, 2), None


def use_span_attention(model) -> None:
    """Register `span_attention` with transformers and make it the model's attention implementation
    (it falls back to SDPA for any forward that passes no spans: generation, other callers)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    AttentionInterface.register(SPAN_ATTENTION, span_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SPAN_ATTENTION, sdpa_mask)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(SPAN_ATTENTION)
