"""Loading a policy and its tokenizer (see `load_policy`)."""
from forkrl.models.loader import EMBEDDED_MODEL, load_policy, load_tokenizer

__all__ = ["EMBEDDED_MODEL", "load_policy", "load_tokenizer"]
