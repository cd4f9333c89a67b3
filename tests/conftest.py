import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the 2-layer random Llama with the embedded model's tokenizer."""
    from forkrl.models import load_policy
    return load_policy("tiny-random", seed=0)
