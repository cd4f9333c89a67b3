"""Sampling: one token per row from next-token logits, with its log-prob and the entropy of the full
distribution, from one softmax pass (the samplers branch on that entropy, so it is exact, not a top-k
estimate). The same code runs on CPU and CUDA; on CPU the common case (T > 0, no top-p, no HAPO) runs
in the compiled kernel (`kernels.py`), which computes the same formulas from the same uniform draw.
"""
from __future__ import annotations

import torch

from forkrl.rollout.engine.kernels import decode_kernel
from forkrl.types import SamplingParams


def adapt_temperature(entropy: torch.Tensor, temperature: torch.Tensor, hapo: torch.Tensor) -> torch.Tensor:
    """HAPO's per-token temperature (algorithms.md §7 b step 1): T' = T (1 + tau clip(h, -1, 1)) with
    h = z / pos_scale (z > 0) or z / neg_scale, z = (log max(H, 1e-8) - mu) / sigma; `hapo` holds
    [B, 5] rows (tau, mu, sigma, pos_scale, neg_scale), tau = 0 for rows that do not adapt."""
    tau, mu, sigma, pos, neg = hapo.unbind(-1)
    z = (torch.log(entropy.clamp(min=1e-8)) - mu) / sigma
    h = torch.where(z > 0, z / pos, z / neg).clamp(-1.0, 1.0)
    return temperature * (1 + tau * h)


_BLOCK = 256  # vocabulary entries per block of the two-level inverse-CDF draw


def sample_next(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None, hapo: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row from [B, V] logits.

    Returns (token ids, their log-probs, entropies), log-probs and entropies under the full
    distribution softmax(logits / T); rows with T = 0 take the argmax and report T = 1 values.
    With `hapo` ([B, 5], see `adapt_temperature`) the token is drawn at T' and its log-prob is under
    T'; the entropy stays the one at T.
    """
    kernel = decode_kernel() if logits.device.type == "cpu" else None
    greedy = temperature <= 0
    if kernel is not None and hapo is None and bool((top_p >= 1).all()):
        # the common case in one compiled pass: same formulas, same uniform draw from `generator`.
        # Greedy rows (a tree's chains beside sampled rows) are drawn at T = 1, which gives their
        # entropy, then take the argmax and its log-prob at T = 1
        u = 1.0 - torch.rand(logits.shape[0], generator=generator, dtype=torch.float64, device=logits.device)
        t = torch.where(greedy, torch.ones_like(temperature), temperature)
        tokens, logp, entropy = kernel.sample(logits.float().contiguous(), t.float().contiguous(), u)
        if bool(greedy.any()):
            rows = greedy.nonzero().squeeze(-1)
            z = logits[rows].float()
            best = z.argmax(-1)
            tokens[rows] = best
            logp[rows] = z.gather(-1, best.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
        return tokens, logp, entropy
    t = torch.where(greedy, torch.ones_like(temperature), temperature).unsqueeze(-1)
    shifted, log_total, probs, entropy = _softmax_parts(logits, t)
    if hapo is not None:
        t = adapt_temperature(entropy, t.squeeze(-1), hapo).unsqueeze(-1)
        shifted, log_total, probs, _ = _softmax_parts(logits, t)
    if bool((top_p < 1).any()):
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p.unsqueeze(-1)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        draw_probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    else:
        draw_probs = probs
    tokens = _inverse_cdf(draw_probs, generator)
    if bool(greedy.any()):
        tokens = torch.where(greedy, logits.argmax(-1), tokens)
    return tokens, shifted.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_total, entropy


def _softmax_parts(logits: torch.Tensor, t: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shifted = z - max z, logsumexp(z) [B], softmax(z), entropy [B]) for z = logits / t.

    Two [B, V] buffers and no other temporaries (at batch 128 each one costs more in page faults than
    the arithmetic it holds). The entropy uses the shifted logits, H = log S - sum p (z - max), so
    large logits do not cancel in float32."""
    z = logits.float()
    if not bool((t == 1).all()):
        z = z / t
    top = z.max(dim=-1, keepdim=True).values
    shifted = torch.sub(z, top)
    probs = shifted.exp()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    log_total = total.log().squeeze(-1)
    entropy = log_total - torch.bmm(probs.unsqueeze(1), shifted.unsqueeze(2)).view(-1)
    return shifted, log_total, probs, entropy


def _inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of unnormalised [B, V] probabilities from a single uniform per row.

    torch.multinomial draws a uniform per vocabulary entry (~40 ms a step at batch 32 over 49k
    tokens on CPU), and a float64 cumsum over the whole vocabulary is most of what is left; two
    levels (which block of 256 entries, then which entry in it) touch the full row only once, to sum
    the blocks. u is in (0, total] and the first entry whose cumulative mass reaches u is drawn, so a
    zero-probability entry is never chosen (the residual is capped at the block's own total, which
    absorbs the rounding between the two sums).
    """
    B, V = probs.shape
    pad = (-V) % _BLOCK
    p = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = p.view(B, -1, _BLOCK)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # [B, nb]; float32 sums of 256: a float64 reduction costs 60x more
    u = (1.0 - torch.rand((B, 1), generator=generator, dtype=torch.float64, device=probs.device)) * block_cdf[:, -1:]
    block = torch.searchsorted(block_cdf, u).clamp(max=block_cdf.shape[1] - 1)      # [B, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), torch.zeros_like(u))
    inner = blocks.gather(1, block.unsqueeze(-1).expand(B, 1, _BLOCK)).squeeze(1).double().cumsum(-1)
    rest = torch.minimum(u - before, inner[:, -1:])
    within = torch.searchsorted(inner, rest).clamp(max=_BLOCK - 1)
    return (block * _BLOCK + within).squeeze(-1).clamp(max=V - 1)


def sampling_tensors(params: list[SamplingParams], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row temperature, top-p and HAPO statistics (None when no row adapts) for `sample_next`."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    hapo = None
    if any(p.adaptive_temperature for p in params):
        hapo = torch.tensor([p.adaptive_temperature or (0.0, 0.0, 1.0, 1.0, 1.0) for p in params],
                            dtype=torch.float32, device=device)
    return temperature, top_p, hapo



def record_top(rows, logits: torch.Tensor, temperature: torch.Tensor, k: int) -> None:
    """Append each row's top `params.logprobs` candidates (id, log-prob at its temperature) to `row.top`."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(-1)
    top_lp, top_ids = torch.log_softmax(logits.float() / t, -1).topk(k, dim=-1)
    top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    for j, q in enumerate(rows):
        if q.params.logprobs:
            q.top.append(list(zip(top_ids[j][:q.params.logprobs], top_lp[j][:q.params.logprobs])))


def generator_for(device: torch.device, seed: int | None, requests) -> torch.Generator:
    """The call's random stream: `seed`, else the first request's `params.seed`, else a fresh one."""
    if seed is None:
        seed = next((r.params.seed for r in requests if r.params.seed is not None), None)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed() % 2**63)
    return generator
