"""Sequence: one completion being sampled (a request's prompt, the tokens drawn for it, their log-probs
and entropies) and the rule that ends it: EOS, a stop string, or max_tokens."""
from __future__ import annotations

from dataclasses import dataclass, field

from forkrl.types import Completion, SamplingParams


@dataclass(eq=False)   # identity: a request's n samples start out equal
class Sequence:
    request: int                 # index of the request it answers
    prompt: list[int]
    params: SamplingParams
    keep_kv: bool                # store its states in the prefix cache when it finishes
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    top: list = field(default_factory=list)
    finish: str | None = None
    length: int = 0              # tokens whose states are in its cache slot (prompt + every token fed back)
    # another sequence whose first `shares_len` tokens are this one's too: decode reads those keys
    # from its slot (one stream of a shared prefix for all its rows; TorchEngine._shared_keys)
    shares: Sequence | None = None
    shares_len: int = 0
    # admitted with all but its last prompt token in its slot: that token rides the next decode step
    # instead of a prefill forward of its own, and its first token is sampled the step after
    pending: bool = False

    def append(self, token: int, logprob: float, entropy: float, is_eos: bool, tokenizer) -> bool:
        """Record a sampled token; True when it ended the sequence (sets `finish`)."""
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.entropies.append(entropy)
        if is_eos:
            self.finish = "eos"
        elif self.params.stop and hit_stop(tokenizer, self.ids, self.params.stop):
            self.finish = "stop"
        elif len(self.ids) >= self.params.max_tokens:
            self.finish = "length"
        return self.finish is not None

    def completion(self, tokenizer) -> Completion:
        body = self.ids[:-1] if self.finish == "eos" else self.ids
        return Completion(self.ids, self.logprobs, self.entropies, self.finish or "length",
                          tokenizer.decode(body, skip_special_tokens=False),
                          self.top if self.params.logprobs else None)


def hit_stop(tokenizer, ids: list[int], stops: list[str]) -> bool:
    """Whether the text of the last few generated tokens contains a stop string.

    Checked after every token, so a match is always one the newest token completed; a token decodes
    to at least one character, so the last len(stop)+2 tokens hold the whole match."""
    window = max(map(len, stops)) + 2
    tail = tokenizer.decode(ids[-window:], skip_special_tokens=False)
    return any(s in tail for s in stops)


def eos_and_pad_ids(model, tokenizer) -> tuple[list[int], int]:
    """The tokens that end a completion (the generation config's and the tokenizer's EOS) and the
    padding id (the tokenizer's, else the first EOS); shared by every engine."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    eos_ids = sorted(eos_ids)
    return eos_ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]


def sequences_of(requests) -> list[Sequence]:
    """One Sequence per completion asked for: `params.n` per request, in request order."""
    seqs = [Sequence(i, list(req.prompt_ids), req.params, req.keep_kv)
            for i, req in enumerate(requests) for _ in range(req.params.n)]
    if any(not q.prompt for q in seqs):
        raise ValueError("every request needs at least one prompt token")
    return seqs
