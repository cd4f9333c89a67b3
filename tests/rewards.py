"""Reward functions the tests use (importable as `tests.rewards:...`)."""


def low_token_ids(prompts, completions, completion_ids, **_):
    """Share of completion tokens whose id is in the lower half of the 49152-token vocabulary:
    a reward a 2-layer random model can learn within a few steps."""
    return [sum(t < 24576 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def fails_on_seven(prompts, completions, **_):
    if any("7" in p for p in prompts):
        raise ValueError("seven is not allowed")
    return [0.0] * len(completions)
