"""What the agent endpoint served, per episode, token for token, and the trajectories it makes.

Each call keeps its prompt ids, the sampled completion (ids, log-probs, exact entropies) and the policy
version. A request whose messages extend an earlier call's exchange (the same messages, then that
call's reply as the assistant turn, then more) continues from that call's exact ids: prompt +
sampled completion + the template's tokens after the reply + the new messages as the template renders
them (a reply cut by max_tokens is closed by the template's end-of-turn token, as context). Nothing
the policy wrote is decoded and re-encoded, and the engine's prefix cache serves the shared part.
Where that is impossible (the agent changed the reply's text, or the template does not render the
conversation as a prefix of its continuation), the request starts a new segment: it is rendered afresh and trained as a separate
trajectory (`splits` counts these).

`trajectories(episode)` turns an episode into training data: each chain of calls becomes one
multi-turn trajectory (the tokens between two calls, e.g. tool results, carry loss mask 0).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

from forkrl.types import Completion, Trajectory


@dataclass
class Call:
    messages: list[dict]
    tools: list | None
    prompt_ids: list[int]
    completion: Completion
    text: str
    version: int
    extends: int | None = None           # index of the call this one continues
    continued_by: list[int] = field(default_factory=list)


def _content(message: dict) -> str:
    """A message's text: a string, or OpenAI's list of parts."""
    c = message.get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c or ""


def _normalise(messages: list[dict]) -> list[dict]:
    return [{**m, "content": _content(m)} for m in messages]


class EpisodeRecorder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.episodes: dict[str, list[Call]] = {}
        self.closed: set[str] = set()
        self.splits = 0
        self._lock = threading.Lock()

    # -- serving ------------------------------------------------------------------------------------
    def render(self, messages: list[dict], tools, generation_prompt: bool) -> list[int]:
        from forkrl.agents.endpoint import RequestError
        try:
            ids = self.tokenizer.apply_chat_template(_normalise(messages), tools=tools or None,
                                                     add_generation_prompt=generation_prompt, tokenize=True,
                                                     return_dict=False)
        except Exception as e:  # noqa: BLE001 - the template's own message is the useful one
            raise RequestError(400, f"the chat template cannot render these messages: {e}") from None
        return list(ids)

    def prompt_for(self, episode: str, messages: list[dict], tools) -> tuple[list[int], int | None]:
        """The prompt ids for a request, and the call it continues (None: a fresh segment)."""
        from forkrl.agents.endpoint import RequestError
        if episode in self.closed:
            raise RequestError(409, f"episode {episode} has ended")
        with self._lock:
            calls = list(self.episodes.get(episode, []))
        messages = _normalise(messages)
        extended_any = False
        for k in reversed(range(len(calls))):
            prev = calls[k]
            m = len(prev.messages)
            if not (len(messages) > m + 1 and messages[:m] == _normalise(prev.messages)
                    and messages[m].get("role") == "assistant" and messages[m]["content"] == prev.text
                    and prev.tools == tools):
                continue
            extended_any = True
            ids = self._continuation(prev, messages, tools)
            if ids is not None:
                return ids, k
            break
        if extended_any:
            with self._lock:
                self.splits += 1
        return self.render(messages, tools, True), None

    def _continuation(self, prev: Call, messages: list[dict], tools) -> list[int] | None:
        if not prev.completion.token_ids:
            return None
        m = len(prev.messages)
        before = self.render(messages[:m], tools, True)          # what prev's prompt renders as
        with_reply = self.render(messages[:m + 1], tools, False)  # ... and with the reply closed
        now = self.render(messages, tools, True)
        if with_reply[:len(before)] != before or now[:len(with_reply)] != with_reply:
            return None
        reply = with_reply[len(before):]
        sampled = list(prev.completion.token_ids)
        # the end-of-turn token: the one the policy sampled, or (a reply cut by max_tokens or a stop
        # string) the tokenizer's, which the template then adds as context, not as policy output
        end = sampled[-1] if prev.completion.finish == "eos" else self.tokenizer.eos_token_id
        if end is None or end not in reply:
            return None
        closing = reply[len(reply) - reply[::-1].index(end) - 1:]   # e.g. <|im_end|> and the newline
        if prev.completion.finish == "eos":
            closing = closing[1:]
        return prev.prompt_ids + sampled + closing + now[len(with_reply):]

    def record(self, episode: str, messages, tools, prompt_ids: list[int], extends: int | None,
               completion: Completion, text: str, version: int) -> None:
        with self._lock:
            calls = self.episodes.setdefault(episode, [])
            calls.append(Call(list(messages), tools, list(prompt_ids), completion, text, version, extends))

    def close(self, episode: str) -> None:
        self.closed.add(episode)

    def pop(self, episode: str) -> list[Call]:
        with self._lock:
            self.closed.add(episode)
            return self.episodes.pop(episode, [])

    # -- training data ------------------------------------------------------------------------------
    @staticmethod
    def trajectories(calls: list[Call]) -> list[Trajectory]:
        """One trajectory per chain of calls; a call continues the chain of the call it extends, unless
        that call was already continued (a fork), which starts a chain of its own."""
        chains: list[list[int]] = []
        chain_of: dict[int, int] = {}
        for i, call in enumerate(calls):
            k = call.extends
            if k is not None and k in chain_of and chains[chain_of[k]][-1] == k:
                chains[chain_of[k]].append(i)
                chain_of[i] = chain_of[k]
            else:
                call.extends = None
                chain_of[i] = len(chains)
                chains.append([i])
        out = []
        for chain in chains:
            first = calls[chain[0]]
            t = Trajectory(prompt_ids=list(first.prompt_ids), tokens=[], logprobs=[], entropies=[], loss_mask=[],
                           group="", policy_version=[], finish=calls[chain[-1]].completion.finish,
                           text=calls[chain[-1]].text, turns=len(chain))
            for i in chain:
                call = calls[i]
                inserted = call.prompt_ids[len(t.prompt_ids) + len(t.tokens):]  # what came between two replies
                t.tokens += inserted
                t.logprobs += [0.0] * len(inserted)
                t.entropies += [math.nan] * len(inserted)
                t.loss_mask += [0] * len(inserted)
                t.policy_version += [call.version] * len(inserted)
                c = call.completion
                t.tokens += list(c.token_ids)
                t.logprobs += list(c.logprobs)
                t.entropies += list(c.entropies)
                t.loss_mask += [1] * len(c.token_ids)
                t.policy_version += [call.version] * len(c.token_ids)
            out.append(t)
        return out
