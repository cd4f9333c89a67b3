"""Loading a policy and its tokenizer (see `load_policy`)."""
from forkrl.models.loader import (
    EMBEDDED_MODEL,
    check_model_spec,
    load_policy,
    load_tokenizer,
    model_context,
)

__all__ = ["EMBEDDED_MODEL", "check_model_spec", "load_policy", "load_tokenizer", "model_context"]
