"""Span attention (forkrl/train/attention.py): the header attended by every query in one fused kernel
call, each span over its borrowed prefix and own tokens in another, merged by log-sum-exp, give the
softmax over the union: outputs and gradients equal an explicit masked softmax."""
from __future__ import annotations

import pytest
import torch

from forkrl.train.attention import Span, _masked_spans, span_attention


class _Layer:
    layer_idx = 0
    training = True


H, HKV, D, HEADER = 4, 2, 16, 7
# three sequences in one row: one that borrows nothing past the header, one continuing the first's
# tokens 0-4 (key columns 7-11), one continuing columns 7-8 and then the second's 3 own tokens
SPANS = [Span(0, 9), Span(9, 15, torch.tensor([7, 8, 9, 10, 11])), Span(15, 20, torch.tensor([7, 8, 16, 17, 18]))]
C = 20


def _visible() -> torch.Tensor:
    """[C, HEADER + C]: which key each query sees, written out by hand from SPANS."""
    seen = torch.zeros(C, HEADER + C, dtype=torch.bool)
    seen[:, :HEADER] = True
    for s in SPANS:
        if s.borrowed is not None:
            seen[s.start:s.end, s.borrowed] = True
        own = torch.arange(s.start, s.end)
        seen[s.start:s.end, HEADER + s.start:HEADER + s.end] = own[:, None] >= own[None, :]
    return seen


def _reference(q, k, v):
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    scores = (q.double() @ k.double().transpose(-1, -2)) / D ** 0.5
    p = scores.masked_fill(~_visible(), float("-inf")).softmax(-1)
    return (p @ v.double()).transpose(1, 2)   # [1, C, H, D]


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g) * 2).to(dtype).requires_grad_()
            for shape in ((1, H, C, D), (1, HKV, HEADER + C, D), (1, HKV, HEADER + C, D))]


def _grads(fn, q, k, v, weight):
    out = fn(q, k, v)
    (out.double() * weight).sum().backward()
    grads = [out.detach().double()] + [x.grad.double() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return grads


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_header_and_spans_merged_by_logsumexp_equal_one_softmax_over_their_union(dtype, tolerance):
    q, k, v = _inputs(dtype)
    weight = torch.randn(1, C, H, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _grads(_reference, q, k, v, weight)
    got = _grads(lambda q, k, v: span_attention(_Layer, q, k, v, None, spans=SPANS)[0], q, k, v, weight)
    masked = _grads(lambda q, k, v: _masked_spans(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                  SPANS, HEADER, 0.0, None).transpose(1, 2),
                    q, k, v, weight)
    for name, a, b, c in zip(("output", "query grad", "key grad", "value grad"), got, masked, want):
        scale = c.abs().max()
        assert scale > 0.1, name
        assert (a - c).abs().max() <= tolerance * scale, name   # the merged kernel calls (CPU)
        assert (b - c).abs().max() <= tolerance * scale, name   # the masked fallback (other devices)


@pytest.mark.parametrize("block", [1, 4 * 9])
def test_backward_in_blocks_of_queries_equals_one_softmax(monkeypatch, block):
    """The backward recomputes each call's probabilities in blocks of queries (BACKWARD_BLOCK score
    elements: here one query row at a time, and rows of 9 keys, which split the header's call and the
    spans' unevenly); the gradients stay those of one softmax over the union."""
    from forkrl.train import attention
    monkeypatch.setattr(attention, "BACKWARD_BLOCK", block)
    q, k, v = _inputs(torch.float32)
    weight = torch.randn(1, C, H, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _grads(_reference, q, k, v, weight)
    got = _grads(lambda q, k, v: span_attention(_Layer, q, k, v, None, spans=SPANS)[0], q, k, v, weight)
    for name, a, c in zip(("output", "query grad", "key grad", "value grad"), got, want):
        assert (a - c).abs().max() <= 1e-6 * c.abs().max(), name


def test_spans_must_cover_the_row_in_order():
    q, k, v = _inputs(torch.float32)
    with pytest.raises(ValueError, match="columns 9..10 uncovered"):
        span_attention(_Layer, q, k, v, None, spans=[Span(0, 9), Span(10, 20)])
    with pytest.raises(ValueError, match="columns 15..20 uncovered"):
        span_attention(_Layer, q, k, v, None, spans=SPANS[:2])
    cols, seen = SPANS[1].keys(HEADER)   # borrowed columns, then its own past the header
    assert cols.tolist() == [7, 8, 9, 10, 11] + list(range(HEADER + 9, HEADER + 15))
    assert seen[:, :5].all() and torch.equal(seen[:, 5:], torch.ones(6, 6, dtype=torch.bool).tril())
    assert SPANS[0].keys(HEADER) == (slice(HEADER, HEADER + 9), None)   # its own, causally


def test_under_autocast_the_blocks_run_in_its_dtype():
    """Under bf16 autocast the projections hand over bf16 queries beside float32 keys (the header's
    float32 leaves); SDPA's autocast rule casts them to one dtype, and so does span attention, which
    calls the kernel directly."""
    q, k, v = _inputs(torch.float32)
    want = _reference(q, k, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = span_attention(_Layer, q.to(torch.bfloat16), k, v, None, spans=SPANS)
    assert out.dtype == torch.bfloat16
    assert (out.double() - want).abs().max() <= 2e-2 * want.abs().max()
