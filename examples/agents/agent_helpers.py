"""What the example agents share."""
import re

MODEL = "forkrl-policy"   # any name: the endpoint serves the policy under every name


def last_number(text: str | None) -> str | None:
    found = re.findall(r"-?\d+(?:\.\d+)?", text or "")
    return found[-1] if found else None
