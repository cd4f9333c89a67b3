"""Small reward functions recipes refer to by `module:function` (TRL signature)."""


def constant_minus_one(prompts, completions, **_):
    """-1 for every completion: with `correct` weighted 2 this gives DAPO's +1 / -1 rule reward."""
    return [-1.0] * len(completions)
