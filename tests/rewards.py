"""Reward functions the tests use (importable as `tests.rewards:...`)."""


def low_token_ids(prompts, completions, completion_ids, **_):
    """Share of completion tokens whose id is in the lower half of the 49152-token vocabulary:
    a reward a 2-layer random model can learn within a few steps."""
    return [sum(t < 24576 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def fails_on_seven(prompts, completions, **_):
    if any("7" in p for p in prompts):
        raise ValueError("seven is not allowed")
    return [0.0] * len(completions)


# -- rewards as TRL's and verl's users write them, unchanged ---------------------------------------
def reward_len(completions, **kwargs):
    """TRL's documentation example: reward completions close to 20 characters."""
    return [-abs(20 - len(completion)) for completion in completions]


def conversational_length(completions, **kwargs):
    """TRL's conversational format: each completion is a list of messages."""
    return [float(len(completion[0]["content"])) for completion in completions]


def math_only(prompts, completions, task_type, **kwargs):
    """A multi-task reward: it applies to math rows only (None elsewhere, as in TRL)."""
    return [1.0 if kind == "math" else None for kind in task_type]


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's custom reward function signature; a dict with a score, as verl allows."""
    assert extra_info is not None and "index" in extra_info, extra_info  # verl passes the row's extra_info
    return {"score": 1.0 if ground_truth in solution_str else 0.0, "data_source": data_source}


BATCHES_SCORED = {"n": 0}


def fails_on_the_third_batch(prompts, completions, **_):
    """A reward whose server goes down at the third batch it scores (tests reset BATCHES_SCORED)."""
    BATCHES_SCORED["n"] += 1
    if BATCHES_SCORED["n"] == 3:
        raise RuntimeError("the reward server is down")
    return [0.0] * len(completions)


def hangs_on_seven(prompts, completions, **_):
    """A reward that never returns for a prompt with a 7 in it."""
    import time
    if any("7" in p for p in prompts):
        time.sleep(3600)
    return [0.0] * len(completions)


def exits_on_the_third_batch(prompts, completions, **_):
    """A reward that ends the process (sys.exit) at the third batch it scores."""
    import sys
    BATCHES_SCORED["n"] += 1
    if BATCHES_SCORED["n"] == 3:
        sys.exit(3)
    return [0.0] * len(completions)
