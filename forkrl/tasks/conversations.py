"""Chat conversations for supervised fine-tuning, rendered exactly as forkrl's rollouts look.

A row is {"messages": [{"role": ..., "content": ...}, ...]}: system/user messages, then the assistant's
episode — assistant messages, with `tool` messages between them for tool results. The part before the
first assistant message goes through the tokenizer's chat template (with the generation prompt). The
episode is laid out the way `forkrl.rollout.agent` produces it, so SFT teaches the format RL samples:
assistant text (trained), a tool result as `\\n<result>\\n...\\n</result>\\n` (loss mask 0), more
assistant text, and the end-of-turn token (trained). Each piece is tokenised on its own, as in rollouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Demonstration:
    prompt_ids: list[int]
    tokens: list[int]
    loss_mask: list[int]
    source: str           # file:line, for messages


def render_conversation(messages: list[dict], tokenizer, result_tag: str = "result") -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, episode token ids, loss mask over the episode)."""
    roles = [m.get("role") for m in messages]
    if "assistant" not in roles:
        raise ValueError("a conversation needs at least one assistant message")
    first = roles.index("assistant")
    head = messages[:first]
    if not head or any(r not in ("system", "user") for r in roles[:first]):
        raise ValueError("messages before the first assistant message must be system/user, and there must be one")
    prompt = list(tokenizer.apply_chat_template(head, add_generation_prompt=True, tokenize=True, return_dict=False))
    end_of_turn = tokenizer.eos_token_id
    tokens: list[int] = []
    mask: list[int] = []
    episode = messages[first:]
    for k, m in enumerate(episode):
        role, content = m.get("role"), m.get("content", "")
        if not isinstance(content, str):
            raise ValueError(f"message {first + k}: content must be text")
        if role == "assistant":
            ids = tokenizer(content, add_special_tokens=False)["input_ids"]
            tokens += ids
            mask += [1] * len(ids)
            last = k == len(episode) - 1 or episode[k + 1].get("role") != "tool"
            if last:
                tokens.append(end_of_turn)
                mask.append(1)
        elif role == "tool":
            if k == 0 or episode[k - 1].get("role") != "assistant":
                raise ValueError(f"message {first + k}: a tool message must follow an assistant message")
            ids = tokenizer(f"\n<{result_tag}>\n{content}\n</{result_tag}>\n", add_special_tokens=False)["input_ids"]
            tokens += ids
            mask += [0] * len(ids)
        else:
            raise ValueError(f"message {first + k}: role {role!r} after the assistant's first message is not "
                             "supported (the episode is assistant and tool messages); split multi-round chats")
    return prompt, tokens, mask


def load_conversations(path: str | Path, tokenizer, result_tag: str = "result") -> list[Demonstration]:
    """Every row of a .jsonl/.parquet file of {"messages": [...]}; a bad row names file and line."""
    from forkrl.io import read_rows
    out = []
    for lineno, row in read_rows(path):
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise ValueError(f"{path}:{lineno}: a row needs a 'messages' list")
        try:
            prompt, tokens, mask = render_conversation(messages, tokenizer, result_tag)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        out.append(Demonstration(prompt, tokens, mask, f"{path}:{lineno}"))
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out
