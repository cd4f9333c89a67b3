"""Pulling a final answer out of a completion and comparing it with a reference."""
from __future__ import annotations

import re

EXTRACTORS = ("answer_tag", "boxed", "last_number", "raw", "auto")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
        j += 1
    return None


def last_number(text: str) -> str | None:
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def extract_answer(text: str, mode: str = "auto") -> str | None:
    """The answer in `text`: `answer_tag` (last <answer>...</answer>), `boxed` (last \\boxed{}),
    `last_number`, `raw` (the stripped text), or `auto` (tag, else boxed, else last number).
    Returns None when the format is missing.
    """
    if mode == "raw":
        return text.strip()
    if mode in ("answer_tag", "auto"):
        tags = _ANSWER_TAG.findall(text)
        if tags:
            return tags[-1].strip()
        if mode == "answer_tag":
            return None
    if mode in ("boxed", "auto"):
        boxed = last_boxed(text)
        if boxed is not None or mode == "boxed":
            return boxed
    if mode in ("last_number", "auto"):
        return last_number(text)
    raise ValueError(f"unknown answer extractor {mode!r}; allowed: {EXTRACTORS}")


def _normalize(s: str) -> str:
    s = s.strip().strip(".").replace(",", "").replace("$", "")
    return " ".join(s.lower().split())


def answers_match(predicted: str | None, reference: str) -> bool:
    """Exact match after light normalisation, else numeric equality, else math-verify equivalence."""
    if predicted is None:
        return False
    if _normalize(predicted) == _normalize(reference):
        return True
    try:
        return abs(float(_normalize(predicted)) - float(_normalize(reference))) < 1e-9
    except ValueError:
        pass
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    try:
        gold = parse(reference if "$" in reference or "\\" in reference else f"${reference}$")
        pred = parse(predicted if "$" in predicted or "\\" in predicted else f"${predicted}$")
        return bool(gold and pred and verify(gold, pred))
    except Exception:  # math-verify raises on unparsable input; that is simply "no match"
        return False
