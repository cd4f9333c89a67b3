"""Span attention: the learner's packed rows attended span by span instead of as one dense square.

The learner's flat layout (`forward.pack_flat`) runs every distinct prefix of a batch once in one
row: a sequence's first tokens may sit in another sequence's columns (a shared prompt or few-shot
header, a tree branch's prefix) and only the rest are its own. Dense attention under a mask would
compute every (query, key) pair of the row, most of them masked. Here a span (a sequence's own
tokens) sees the row's header (when it has one: key columns 0..H, every span), the prefix it
continues (`borrowed`: another sequence's key columns) and its own tokens, causally:

    a sequence that borrows nothing:  queries s..s+m, keys [header | s..s+m], causal on its own
    one that continues a prefix:      queries s..s+m, keys [header | the prefix's columns | s..s+m]

On the CPU the header is one fused-kernel call for all the row's queries (one large product instead
of one per span), each span one call over its borrowed and own keys (unmasked and causal when it
borrows nothing), and the two are merged by their log-sum-exp: the softmax over the union, as flash
attention merges the key tiles it visits. Backward recomputes each call's probabilities from the
merged log-sum-exp and takes its softmax correction from the merged output (`_call_backward`, in
float32), which is exactly that call's share of the gradient. Elsewhere (or with attention dropout)
each span runs one masked SDPA call over all the keys it sees.

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

from dataclasses import dataclass, field

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
    # built once per forward and read by every layer: (header, key columns, seen) and the additive masks
    _keys: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _masks: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def keys(self, header: int) -> tuple[slice | Tensor, Tensor | None]:
        """The key columns past the header this span sees (borrowed, then its own) and which of them
        each query sees, [len, keys] (None: its own only, causally). Built once per forward, not per
        layer."""
        own = slice(header + self.start, header + self.end)
        if self.borrowed is None or not len(self.borrowed):
            return own, None
        if self._keys is None or self._keys[0] != header:
            m, b = self.end - self.start, len(self.borrowed)
            seen = torch.ones((m, b + m), dtype=torch.bool)
            seen[:, b:] = torch.ones((m, m), dtype=torch.bool).tril()
            self._keys = (header, torch.cat([self.borrowed, torch.arange(own.start, own.stop)]), seen)
        return self._keys[1], self._keys[2]

    def additive(self, header: int, dtype: torch.dtype) -> Tensor | None:
        """The mask of `keys` as the kernel takes it (0 / -inf); None when it needs none."""
        _, seen = self.keys(header)
        if seen is None:
            return None
        if (header, dtype) not in self._masks:
            self._masks[(header, dtype)] = torch.zeros(seen.shape, dtype=dtype).masked_fill(~seen, float("-inf"))
        return self._masks[(header, dtype)]


def _covered(spans: list[Span], C: int) -> None:
    filled = 0
    for s in spans:
        if s.start != filled:
            raise ValueError(f"spans leave columns {filled}..{s.start} uncovered")
        filled = s.end
    if filled != C:
        raise ValueError(f"spans leave columns {filled}..{C} uncovered")


def _take(x: Tensor, cols) -> Tensor:
    # index_select, not x[:, :, cols]: its backward is an index_add, 2.7x faster on the CPU than
    # advanced indexing's accumulating index_put (measured fwd + bwd, 900 of 3,500 keys)
    return x[:, :, cols] if isinstance(cols, slice) else x.index_select(2, cols)


_KERNEL = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
# score elements (heads x queries x keys) one block of `_call_backward` holds in float32 at a time
BACKWARD_BLOCK = 1 << 21


_ABOVE: list[Tensor] = [torch.ones((0, 0), dtype=torch.bool)]


def _above_diagonal(n: int) -> Tensor:
    """[n, n], True above the diagonal: the keys a causal query does not see. One matrix, grown to
    the longest span so far and sliced, instead of one per call and layer."""
    if _ABOVE[0].shape[0] < n:
        _ABOVE[0] = torch.ones((n, n), dtype=torch.bool).triu(1)
    return _ABOVE[0][:n, :n]


def _call_backward(grad: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                   mask: Tensor | None, causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """One kernel call's dq, dk, dv from its probabilities, recomputed as P = exp(S - L) with
    S = scale·q·kᵀ + mask and the merged log-sum-exp L, and dS = P ⊙ (grad·vᵀ - rowsum(grad ⊙ out)):
    flash attention's backward (Dao et al., 2022, Alg. 4) as a few matrix products over blocks of
    queries, on float32 inputs; a causal block reads only the keys its queries see. The CPU flash
    kernel's own backward took 2-3.5x as long for spans of 35-300 keys, 1.6x for a header call of
    2,000 queries over 711 keys and 1.05-1.25x for a 1,000-token causal span (SmolLM2's 9 heads of
    64, bf16 inputs, 2 threads), and is less exact: it multiplies the bf16 inputs as they come."""
    H, Lq, D = query.shape[1:]
    Lk = key.shape[2]
    scale = D ** -0.5 if scale is None else scale
    dq = torch.empty(query.shape, dtype=query.dtype)
    dk, dv = torch.zeros(key.shape, dtype=key.dtype), torch.zeros(value.shape, dtype=value.dtype)
    rows = max(BACKWARD_BLOCK // max(H * Lk, 1), 1)
    for a in range(0, Lq, rows):
        b = min(a + rows, Lq)
        n = min(b, Lk) if causal and mask is None else Lk   # causal: rows a..b see keys 0..b only
        q, g, k, v = query[:, :, a:b], grad[:, :, a:b], key[:, :, :n], value[:, :, :n]
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)
        if mask is not None:
            s += mask[a:b]
        elif causal:   # top-left aligned, as the kernel's is_causal: query i sees keys 0..i
            s.masked_fill_(_above_diagonal(n)[a:b], float("-inf"))
        p = s.sub_(lse[:, :, a:b].unsqueeze(-1)).exp_()
        dv[:, :, :n] += torch.matmul(p.transpose(-1, -2), g)
        delta = (g * out[:, :, a:b]).sum(-1, keepdim=True)
        ds = p.mul_(torch.matmul(g, v.transpose(-1, -2)).sub_(delta)).mul_(scale)
        dq[:, :, a:b] = torch.matmul(ds, k)
        dk[:, :, :n] += torch.matmul(ds.transpose(-1, -2), q)
    return dq, dk, dv


class _HeaderAndSpans(torch.autograd.Function):
    """Each span over its own keys, one kernel call each; the header (`header` key columns) over
    every query in one call; merged by log-sum-exp: with L = log(exp(L_spans) + exp(L_header)),
    out = exp(L_spans - L) · out_spans + exp(L_header - L) · out_header."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, spans: list[Span], header: int,
                scale: float | None):
        calls, outs, lses = [], [], []
        for s in spans:
            cols, _ = s.keys(header)
            mask = s.additive(header, query.dtype)
            o, lse = _KERNEL(query[:, :, s.start:s.end], _take(key, cols), _take(value, cols), 0.0, mask is None,
                             attn_mask=mask, scale=scale)[:2]
            calls.append((s.start, s.end, cols, mask))
            outs.append(o)
            lses.append(lse)
        out, lse = torch.cat(outs, dim=2), torch.cat(lses, dim=2)
        if header:
            o, lse_h = _KERNEL(query, key[:, :, :header], value[:, :, :header], 0.0, False, scale=scale)[:2]
            merged = torch.logaddexp(lse, lse_h)
            out = (out.float() * (lse - merged).exp().unsqueeze(-1)
                   + o.float() * (lse_h - merged).exp().unsqueeze(-1)).to(query.dtype)
            lse = merged
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.calls, ctx.header, ctx.scale = calls, header, scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # float32 once per layer, not per call: the products below run in it
        query, key, value, out, lse = (x.float() for x in ctx.saved_tensors)
        grad = grad.float()
        dk = torch.zeros(key.shape, dtype=torch.float32)
        dv = torch.zeros(value.shape, dtype=torch.float32)
        dq = []
        # a call's probabilities recomputed as exp(q·kᵀ - L) with the merged L, and its softmax
        # correction from rowsum(grad · out) with the merged out: the call's exact share
        for q0, q1, cols, mask in ctx.calls:
            gq, gk, gv = _call_backward(grad[:, :, q0:q1], query[:, :, q0:q1], _take(key, cols), _take(value, cols),
                                        out[:, :, q0:q1], lse[:, :, q0:q1], mask, mask is None, ctx.scale)
            dq.append(gq)
            if isinstance(cols, slice):
                dk[:, :, cols] += gk
                dv[:, :, cols] += gv
            else:
                dk.index_add_(2, cols, gk)
                dv.index_add_(2, cols, gv)
        dq = torch.cat(dq, dim=2)
        if ctx.header:
            gq, gk, gv = _call_backward(grad, query, key[:, :, :ctx.header], value[:, :, :ctx.header], out, lse,
                                        None, False, ctx.scale)
            dq += gq
            dk[:, :, :ctx.header] += gk
            dv[:, :, :ctx.header] += gv
        return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), None, None, None


def _masked_spans(query: Tensor, key: Tensor, value: Tensor, spans: list[Span], header: int, dropout: float,
                  scale: float | None) -> Tensor:
    """The same attention with one masked SDPA call per span over all the keys it sees (any device)."""
    parts = []
    for s in spans:
        cols, seen = s.keys(header)
        if isinstance(cols, slice):
            cols, seen = torch.arange(cols.start, cols.stop), torch.ones((s.end - s.start,) * 2, dtype=torch.bool).tril()
        cols = torch.cat([torch.arange(header), cols]).to(query.device)
        seen = torch.cat([torch.ones((len(seen), header), dtype=torch.bool), seen], dim=1).to(query.device)
        parts.append(F.scaled_dot_product_attention(query[:, :, s.start:s.end], key.index_select(2, cols),
                                                    value.index_select(2, cols), attn_mask=seen,
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
    _covered(spans, C)
    header_len = key.shape[2] - C   # header columns before the row's own
    groups = H // key.shape[1]
    if groups > 1:  # one copy for all calls instead of one per call
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    p = dropout if module.training else 0.0
    if query.device.type == "cpu" and p == 0.0:
        # the kernel is called directly, so autocast's casting for SDPA is done here: one dtype for all
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
        with torch.autocast("cpu", enabled=False):
            out = _HeaderAndSpans.apply(query.to(dtype), key.to(dtype), value.to(dtype), spans, header_len, scaling)
    else:
        out = _masked_spans(query, key, value, spans, header_len, p, scaling)
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
