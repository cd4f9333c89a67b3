"""The learner's forward: packed rows through the decoder, and the vocabulary projection only where
the loss reads, in chunks.

Memory: the projection runs on chunks of `chunk` response tokens under activation checkpointing, so
neither the forward nor the backward ever holds a [batch, time, vocab] tensor; only response tokens
the policy generated are projected (prompt and observation tokens are not).

A mini-batch's header (`Header`: the tokens every one of its sequences starts with, a system prompt
and few-shot examples) runs once for all its micro-batches: its keys and values are computed once,
every micro-batch's span attention reads them before its own, and the micro-batches' gradients
for them are summed and sent back through the header's forward once (`Header.backward`).

`PolicyForward` is a module so that FSDP2 can shard it: its forward is the root forward, whose hooks
gather the parameters outside the decoder layers (embeddings, final norm, output head, tied or not).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from forkrl.models.adapters import active_adapter
from forkrl.train.attention import Span, use_span_attention
from forkrl.train.batch import PackedBatch
from forkrl.types import shared_prefix


def _decoder_and_head(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _autocast(enabled: bool, device_type: str = "cpu"):
    """bf16 autocast on the model's device (float32 master weights stay as they are)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def _project(head, h: Tensor, targets: Tensor, inv_temp: float) -> tuple[Tensor, Tensor]:
    logits = head(h).float() * inv_temp
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@dataclass
class Header:
    """Tokens every sequence of a mini-batch starts with, run once for all its micro-batches.

    `keys` / `values`: each layer's, [1, Hkv, len, D], as float32 leaves the micro-batches read
    (their backwards sum the gradients into them); `outputs`: the same tensors with the header forward's
    graph. `backward()` sends the summed gradients through that graph once, so the parameters get
    exactly the gradient of running the header inside every micro-batch."""
    ids: list[int]
    keys: list[Tensor]
    values: list[Tensor]
    outputs: list[Tensor]

    def backward(self) -> None:
        leaves = self.keys + self.values
        pairs = [(o, leaf.grad) for o, leaf in zip(self.outputs, leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
        for leaf in leaves:
            leaf.grad = None


def hidden_states(model, batch: PackedBatch, autocast: bool, spans: bool = False, header: Header | None = None
                  ) -> tuple[Tensor, torch.device, PackedRows]:
    """The decoder's last hidden state at every packed position, [R*C, d], from one forward over
    `pack_rows(batch)` (`packed.before` indexes the state before each loss_mask token); the model's
    device; the packed rows. `spans`: the flat layout attended span by span
    (`attention.span_attention`, which the model must use) instead of the dense rows under their mask.
    `header` (spans only): every sequence starts with its tokens, whose keys are read, not run."""
    decoder, _ = _decoder_and_head(model)
    device = next(model.parameters()).device
    if header is not None and not spans:
        raise ValueError("a header is read by span attention only (train.attention: spans)")
    packed = pack_flat(batch, header.ids if header is not None else None) if spans else pack_rows(batch)
    extra = {"spans": packed.spans, "header": header} if spans else {}
    with _autocast(autocast, device.type):
        out = decoder(input_ids=packed.ids.to(device), attention_mask=packed.mask.to(device),
                      position_ids=packed.positions.to(device), use_cache=False, **extra).last_hidden_state
    return out.reshape(-1, out.shape[-1]), device, packed


@dataclass
class PackedRows:
    """Sequences packed for one forward that runs shared tokens once.

    Dense layout (`flat=False`): rows of [prompt | response a | response b | ...], all responses of
    one prompt, filled up to the longest (prompt + response) of the batch, so a packed row is never
    longer than an unpacked one would be (a tree's row excepted, below) and dense attention stays
    affordable. A 4D mask lets each response see the prompt and its own earlier tokens only, and
    positions restart after the prompt for each response, so every response computes exactly what it
    would alone; the prompt runs once per row and gets the gradient of every response in it.

    Flat layout (`flat=True`, for span attention; `pack_flat`): one row in which every distinct
    prefix runs once. Each sequence (prompt + response) reads the longest prefix it shares with a
    sequence placed before it from that sequence's columns and runs only the rest: a group's prompt,
    the few-shot header several prompts share, a tree branch's prefix, the first tokens of samples
    that happen to agree. There is no padding, `spans` say which keys each run of queries sees, and no
    dense mask is built (`mask` is a [1, 1, C, C] view of one element).

    In the dense layout, tree branches (`PackedBatch.token_origin`: a branch's first tokens are its
    parent's) are packed behind their parent, in its row, with only the tokens after the branch point: the mask reaches back to
    the parent's columns for the shared prefix, and the shared tokens' states are read from there.
    Each shared token is then computed once for all the branches that share it, and every branch's
    log-probs, entropies and gradients are those of computing it alone (the state is gathered once
    per branch, so backward sums the branches' gradients into it).
    """
    ids: Tensor       # [R, C]
    positions: Tensor # [R, C]
    mask: Tensor      # [R, 1, C, C] bool: key j visible to query i
    before: Tensor    # [N] flat index into R*C of the state before each loss_mask token (row-major)
    padding: float    # share of the R*C positions that are padding
    shared: int = 0   # response tokens read from another sequence's columns instead of run again
    run: int = 0      # tokens the forward runs
    spans: list[Span] = field(default_factory=list)  # flat layout: each sequence's own tokens and their keys


def _shared_keys(origin: Tensor | None) -> bool:
    if origin is None:
        return False
    keys = origin[origin >= 0]
    return len(torch.unique(keys)) < len(keys)


def pack_rows(batch: PackedBatch, flat: bool = False) -> PackedRows:
    if flat:
        return pack_flat(batch)
    valid = batch.loss_mask > 0
    L = valid.shape[1]
    # response tokens that matter: up to the last generated one (`select` cut what no loss reads)
    need = (valid * torch.arange(1, L + 1)).max(-1).values.tolist()
    plen = batch.prompt_mask.sum(-1).tolist()
    pidx = batch.prompt_index.tolist()
    cap = max(plen[p] + n for p, n in zip(pidx, need))
    origin = batch.token_origin.tolist() if _shared_keys(batch.token_origin) else None
    rows: list[int] = []                     # prompt of each row
    used: list[int] = []                     # columns filled in each row
    latest: dict[int, int] = {}              # prompt -> its newest row
    placed: dict[int, tuple[int, int]] = {}  # token key -> (row, column) where it runs
    cols: dict[int, tuple[int, list[int]]] = {}  # trajectory -> (row, column of each of its tokens)
    own: dict[int, tuple[int, int]] = {}     # trajectory -> (first own column, first own token)
    shared = 0
    for b, (p, n) in enumerate(zip(pidx, need)):
        if n == 0:
            continue
        k = 0          # leading tokens already placed (a parent's prefix) in row `r`
        r = None
        if origin is not None and origin[b][0] in placed:
            r = placed[origin[b][0]][0]
            while k < n and origin[b][k] in placed and placed[origin[b][k]][0] == r:
                k += 1
        if r is None:
            r = latest.get(p, -1)
            if r < 0 or used[r] + n > cap:
                r = len(rows)
                rows.append(p)
                used.append(plen[p])
                latest[p] = r
        start = used[r]
        where = [placed[origin[b][t]][1] for t in range(k)] + list(range(start, start + n - k))
        used[r] = start + n - k
        cols[b], own[b] = (r, where), (start, k)
        shared += k
        if origin is not None:
            for t in range(k, n):
                placed[origin[b][t]] = (r, start + t - k)
    # a tree's row holds the whole tree (its branches always join their parent), so it may be longer
    # than the longest single sequence; other responses fill rows up to that
    R, C = max(len(rows), 1), max(used, default=cap)
    ids = torch.zeros((R, C), dtype=torch.long)  # padding ids: any token, the mask isolates them
    pos = torch.zeros((R, C), dtype=torch.long)
    mask = torch.zeros((R, C, C), dtype=torch.bool)
    real = torch.zeros((R, C), dtype=torch.bool)
    causal = torch.ones((C, C), dtype=torch.bool).tril()
    for r, p in enumerate(rows):
        n_p = plen[p]
        ids[r, :n_p] = batch.prompt_ids[p, -n_p:]
        pos[r, :n_p] = torch.arange(n_p)
        mask[r, :n_p, :n_p] = causal[:n_p, :n_p]
        real[r, :n_p] = True
    for b, (r, where) in cols.items():
        start, k = own[b]
        n = need[b]
        n_p = plen[pidx[b]]
        m = n - k
        ids[r, start:start + m] = batch.resp_ids[b, k:n]
        pos[r, start:start + m] = n_p + k + torch.arange(m)
        mask[r, start:start + m, :n_p] = True                       # the prompt
        if k:
            mask[r, start:start + m, where[:k]] = True             # the parent's columns of the shared prefix
        mask[r, start:start + m, start:start + m] = causal[:m, :m]  # its own tokens, causally
        real[r, start:start + m] = True
    pad = ~real
    mask[pad] = False
    mask.diagonal(dim1=1, dim2=2)[pad] = True  # padding sees itself: no empty softmax row
    before = []
    for b, t in valid.nonzero().tolist():
        r, where = cols[b]
        before.append(r * C + (plen[rows[r]] - 1 if t == 0 else where[t - 1]))
    padding = float(pad.sum()) / (R * C)
    return PackedRows(ids, pos, mask.unsqueeze(1), torch.tensor(before, dtype=torch.long), padding, shared,
                      int(real.sum()))


def pack_flat(batch: PackedBatch, header: list[int] | None = None) -> PackedRows:
    """The flat layout (see PackedRows): each sequence runs only what no earlier sequence ran.

    Sequences are placed in batch order (a group's, a tree's members are together). Sequence b is
    prompt + response up to its last generated token (`PackedBatch.select` cut the row after its last
    trained one); it takes the placed sequence with which it shares the longest prefix (k tokens),
    reads those k states from that sequence's columns and runs its other tokens as one span: queries
    at its new columns, keys the k borrowed columns then its own, causal on its own. Positions are
    indices into the sequence, so every state is the one the sequence computes alone: a state
    depends only on the tokens before it. A sequence that is a prefix of one placed before it runs
    nothing.

    `header`: tokens every sequence starts with whose keys sit before the row (`Header`): they count
    as placed at key columns 0..len-1 and the row's own columns follow them in key space; spans'
    queries and `before` stay in row columns."""
    valid = batch.loss_mask > 0
    L = valid.shape[1]
    need = (valid * torch.arange(1, L + 1)).max(-1).values.tolist()
    plen = batch.prompt_mask.sum(-1).tolist()
    pidx = batch.prompt_index.tolist()
    prompts = {p: batch.prompt_ids[p, batch.prompt_ids.shape[1] - plen[p]:].tolist() for p in set(pidx)}
    H = len(header) if header else 0
    # (tokens, key column of each token) per sequence so far
    placed: list[tuple[list[int], list[int]]] = [(list(header), list(range(H)))] if H else []
    paths: dict[int, list[int]] = {}
    ids: list[int] = []
    positions: list[int] = []
    spans: list[Span] = []
    shared = 0
    for b, (p, n) in enumerate(zip(pidx, need)):
        if n == 0:
            continue
        seq = prompts[p] + batch.resp_ids[b, :n].tolist()
        if H and (len(seq) <= H or seq[:H] != header):
            raise ValueError(f"sequence {b} does not continue the header it is packed with")
        k, path = 0, []
        for other, cols in placed:
            if other[k:k + 1] == seq[k:k + 1]:   # can beat k only if it agrees at position k
                m = shared_prefix(other, seq)
                if m > k:
                    k, path = m, cols
        start, own = len(ids), len(seq) - k
        ids += seq[k:]
        positions += range(k, len(seq))
        path = path[:k] + list(range(H + start, H + start + own))
        if own:   # the header's columns are seen by every span: what it borrows besides them
            spans.append(Span(start, start + own, torch.tensor(path[H:k], dtype=torch.long) if k > H else None))
        shared += max(k - plen[p], 0)
        placed.append((seq, path))
        paths[b] = path
    before = [paths[b][plen[pidx[b]] + t - 1] - H for b, t in valid.nonzero().tolist()]
    if H and min(before, default=0) < 0:
        raise ValueError("the header reaches a state the loss reads: it must end before every prompt does")
    C = len(ids)
    return PackedRows(torch.tensor([ids], dtype=torch.long).view(1, C), torch.tensor([positions], dtype=torch.long).view(1, C),
                      torch.ones((1, 1, 1, 1), dtype=torch.bool).expand(1, 1, C, C), torch.tensor(before, dtype=torch.long),
                      0.0, shared, C, spans)


def _spans_wanted(model, attention: str) -> bool:
    """Span attention (`attention.py`) for `attention: spans`, or `auto` on the CPU, where attention
    over packed rows costs as much as the linear layers; dense SDPA on accelerators, where one dense
    call beats many small ones."""
    if attention not in ("auto", "dense", "spans"):
        raise ValueError(f"attention must be auto, dense or spans, got {attention!r}")
    if attention == "dense" or (attention == "auto" and next(model.parameters()).device.type != "cpu"):
        return False
    use_span_attention(model)
    return True


class PolicyForward(torch.nn.Module):
    """Log-prob of each response token and entropy of its full next-token distribution under
    softmax(logits / temperature), [B, L] each and zero where loss_mask is 0; or, with
    `full_distribution`, the whole next-token log-distribution at every trained position, [N, V]
    (for small probes only). One forward over `pack_rows(batch)`."""

    def __init__(self, model, *, temperature: float = 1.0, chunk: int = 1024, autocast: bool = False,
                 attention: str = "auto"):
        super().__init__()
        self.model = model
        self.spans = _spans_wanted(model, attention)
        self.inv_temp = 1.0 / temperature if temperature > 0 else 1.0
        self.chunk, self.autocast = chunk, autocast
        # what the forwards ran, summed: tokens run, and branch tokens read from a parent's columns
        self.tokens_run = self.tokens_shared = 0

    def run_header(self, ids: list[int]) -> Header:
        """Run `ids` (a prefix every sequence of the coming micro-batches starts with) once and keep
        each layer's keys and values: with the header's graph when grad is enabled."""
        if not self.spans:
            raise ValueError("a header is read by span attention only (train.attention: spans)")
        decoder, _ = _decoder_and_head(self.model)
        device = next(self.model.parameters()).device
        n = len(ids)
        record: dict[int, tuple[Tensor, Tensor]] = {}
        with _autocast(self.autocast, device.type):
            decoder(input_ids=torch.tensor([ids], device=device), position_ids=torch.arange(n, device=device)[None],
                    attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device).expand(1, 1, n, n),
                    use_cache=False, spans=[Span(0, n)], record=record)
        self.tokens_run += n
        layers = sorted(record)
        outputs = [record[i][0] for i in layers] + [record[i][1] for i in layers]
        # float32 leaves: the micro-batches' gradients (bf16 under autocast) add up at full precision
        leaves = [o.detach().float().requires_grad_(o.requires_grad) for o in outputs]
        return Header(list(ids), leaves[:len(layers)], leaves[len(layers):], outputs)

    def forward(self, batch: PackedBatch, full_distribution: bool = False, header: Header | None = None):
        """`header`: a `run_header` result every row of `batch` starts with (span attention)."""
        _, head = _decoder_and_head(self.model)
        with active_adapter(self.model, batch.adapter_of()):  # the rows' LoRA adapter (model.adapters)
            states, device, packed = hidden_states(self.model, batch, self.autocast, self.spans, header)
        self.tokens_run += packed.run
        self.tokens_shared += packed.shared
        valid = batch.loss_mask > 0
        before = packed.before.to(device)
        if full_distribution:
            return torch.log_softmax(head(states[before]).float() * self.inv_temp, dim=-1)
        targets = batch.resp_ids[valid].to(device)
        # sequences that share a prefix read the same states with the same next tokens: each (state,
        # next token) pair is projected once, and indexing sums the gradients of its readers back
        vocab = head.weight.shape[0]
        pairs, inverse = torch.unique(before * vocab + targets, return_inverse=True)
        h, targets = states[pairs // vocab], pairs % vocab
        lp_parts, ent_parts = [], []
        with _autocast(self.autocast, device.type):  # the head is a fifth of the matmuls: same precision
            for s in range(0, h.shape[0], self.chunk):
                hc, tc = h[s:s + self.chunk], targets[s:s + self.chunk]
                if torch.is_grad_enabled():
                    lp, ent = checkpoint(_project, head, hc, tc, self.inv_temp, use_reentrant=False)
                else:
                    lp, ent = _project(head, hc, tc, self.inv_temp)
                lp_parts.append(lp)
                ent_parts.append(ent)
        B, L = batch.resp_ids.shape
        logp = torch.zeros((B, L), dtype=torch.float32, device=device)
        entropy = torch.zeros((B, L), dtype=torch.float32, device=device)
        if lp_parts:
            where = tuple(i.to(device) for i in valid.nonzero(as_tuple=True))
            logp = logp.index_put(where, torch.cat(lp_parts)[inverse])
            entropy = entropy.index_put(where, torch.cat(ent_parts)[inverse])
        return logp, entropy


class ValueForward(torch.nn.Module):
    """A value model: a causal LM's decoder plus a scalar head, read at the state before each
    generated token (the positions `PolicyForward` projects), [B, L] float32 and zero where loss_mask
    is 0. The same packed rows as the policy's forward."""

    def __init__(self, model, *, autocast: bool = False, attention: str = "auto"):
        super().__init__()
        self.model = model
        self.spans = _spans_wanted(model, attention)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # zero-initialised: the critic starts at V = 0 and explained variance 0, not at noise
        self.head = torch.nn.Linear(base.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(next(model.parameters()).device)
        self.autocast = autocast

    def forward(self, batch: PackedBatch) -> Tensor:
        with active_adapter(self.model, batch.adapter_of()):
            states, device, packed = hidden_states(self.model, batch, self.autocast, self.spans)
        v = self.head(states[packed.before.to(device)].float()).squeeze(-1)
        values = torch.zeros(batch.resp_ids.shape, dtype=torch.float32, device=device)
        if v.numel():
            values = values.index_put(tuple(i.to(device) for i in (batch.loss_mask > 0).nonzero(as_tuple=True)), v)
        return values


def response_logprobs(model, batch: PackedBatch, *, temperature: float = 1.0, chunk: int = 1024,
                      autocast: bool = False) -> tuple[Tensor, Tensor]:
    """`PolicyForward(model, ...)(batch)`: log-probs and entropies of the response tokens, [B, L] each."""
    return PolicyForward(model, temperature=temperature, chunk=chunk, autocast=autocast)(batch)


@torch.no_grad()
def response_log_softmax(model, batch: PackedBatch, *, temperature: float = 1.0) -> Tensor:
    """The full next-token log-distribution at every trained response position, [N, V] (row-major
    over loss_mask). For small probes only: N x V floats."""
    forward = model if isinstance(model, PolicyForward) else PolicyForward(model, temperature=temperature)
    return forward(batch, full_distribution=True)


def entropy_change_states(before: Tensor, after: Tensor) -> tuple[Tensor, Tensor]:
    """Per state, the measured entropy change and its first-order prediction, from the full
    log-distributions before and after an update ([N, V] each).

    Cui et al. (2025, arXiv 2505.22617, Lemma 1; algorithms.md §4): for a softmax policy whose logits
    move by dz, H(after) - H(before) ~= -Cov_{a~pi}(log pi(a|s), dz(a)). d log pi differs from dz by
    a constant per state, which the covariance ignores, so d log pi stands in for dz exactly.
    """
    p = before.exp()
    h_before = -(p * before).sum(-1)
    h_after = -(after.exp() * after).sum(-1)
    centred = before + h_before.unsqueeze(-1)           # log pi - E_pi[log pi]
    predicted = -(p * centred * (after - before)).sum(-1)
    return h_after - h_before, predicted


def entropy_change_metrics(measured: Tensor, predicted: Tensor) -> dict[str, float]:
    """Their means and their correlation across states."""
    if measured.numel() == 0:
        return {}
    out = {"entropy/delta_measured": float(measured.mean()), "entropy/delta_predicted": float(predicted.mean())}
    if measured.numel() > 2 and float(measured.std()) > 0 and float(predicted.std()) > 0:
        out["entropy/delta_state_corr"] = float(torch.corrcoef(torch.stack([measured, predicted]))[0, 1])
    return out


def entropy_change(before: Tensor, after: Tensor) -> dict[str, float]:
    """Measured vs first-order predicted entropy change of the same states (see entropy_change_states)."""
    return entropy_change_metrics(*entropy_change_states(before, after))


BF16_MIN_SPEEDUP = 1.2  # bf16 products also round; on a CPU they must be this much faster to be used


def resolve_autocast(setting, model) -> bool:
    """train.bf16_autocast resolved. "auto" is on for float32 weights where rollout.engine_dtype=auto
    picks bf16 (native bf16 arithmetic, at least 10M parameters), and on a CPU only where bf16
    products of the model's shapes measured at least BF16_MIN_SPEEDUP times as fast as float32 ones:
    some CPUs with AVX-512 BF16 multiply faster in float32 (`forkrl.cpu`). Decoding keeps bf16 there,
    since a decode step is bound by reading the weights, not by multiplying them."""
    if setting != "auto":
        return bool(setting)
    from forkrl.rollout.engine.runner import resolve_dtype
    param = next(model.parameters())
    if param.dtype != torch.float32 or resolve_dtype("auto", model) != torch.bfloat16:
        return False
    if param.device.type != "cpu":
        return True
    from forkrl.cpu import bf16_matmul_speedup
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.config.hidden_size
    speedup = bf16_matmul_speedup(hidden, getattr(base.config, "intermediate_size", None) or 4 * hidden)
    return speedup >= BF16_MIN_SPEEDUP


def activation_bytes_per_token(model, checkpointing: bool = False, autocast: bool = False) -> int:
    """Activation memory a trained token holds until backward, estimated from the model's shape.

    Per decoder layer autograd keeps, in float32: the residual input and the two norm outputs, q, k, v,
    the attention output and its projection (about 7 x hidden + 2 x kv width), and the MLP's gate, up,
    activation and product (4 x intermediate); autocast adds bf16 copies of the matmul inputs (2 bytes
    x (4 x hidden + intermediate)). With checkpointing a layer keeps only its input, plus one layer's
    full set while it is recomputed. Against the bytes autograd actually saves on SmolLM2-135M
    (tests/test_learner_memory.py) it is within 1.5x either way.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    c = base.config
    d = c.hidden_size
    inter = getattr(c, "intermediate_size", 4 * d)
    kv = getattr(c, "num_key_value_heads", c.num_attention_heads) * (getattr(c, "head_dim", None) or d // c.num_attention_heads)
    per_layer = 4 * (7 * d + 2 * kv + 4 * inter) + (2 * (4 * d + inter) if autocast else 0)
    layers = c.num_hidden_layers
    return 4 * d * layers + per_layer if checkpointing else per_layer * layers


