"""What the user can fix: `UserError` and its kinds. The CLI prints one `forkrl: ...` line for each
and exits 2; anything else is a bug and keeps its traceback. Part of the ground floor."""
from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave forkrl (config, data, reward, model path, environment)."""


class DataError(UserError, ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


class RewardFunctionError(UserError, RuntimeError):
    """A reward function that cannot be called or fails; the message names the function and sample."""


class RunDirError(UserError):
    """An output directory that holds another run, or a path that is not a run."""


def missing_dependency(package: str, extra: str | None, needed_for: str) -> UserError:
    """One line for an optional dependency that is not installed."""
    how = f"pip install 'forkrl[{extra}]'" if extra else f"pip install {package}"
    return UserError(f"{needed_for} needs {package}, which is not installed: {how}")
