"""The embedded SmolLM2-135M-Instruct: converted once and cached, and the engine decodes exactly
what Hugging Face `generate` decodes."""
import time

import pytest
import torch

from forkrl.models import load_policy
from forkrl.rollout import GenerationRequest, SamplingParams, TorchEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    load_policy("smollm2-135m")  # converts the GGUF on first use
    start = time.perf_counter()
    model, tok = load_policy("smollm2-135m")
    return model, tok, time.perf_counter() - start


def test_second_load_comes_from_the_cache(smollm):
    model, tok, seconds = smollm
    assert seconds < 10, f"cached load took {seconds:.1f}s"
    assert model.config.num_hidden_layers == 30 and len(tok) == 49152
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_greedy_engine_matches_hf_generate(smollm):
    model, tok, _ = smollm
    questions = ["What is 3 + 4?", "Name a colour.", "Write a haiku about the sea."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in questions]
    engine = TorchEngine(model, tok)
    outs = engine.generate([GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=16)) for p in prompts])
    for p, o in zip(prompts, outs):
        with torch.inference_mode():
            ref = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=16,
                                 pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert o[0].token_ids == ref
        assert all(lp <= 0 for lp in o[0].logprobs) and all(e >= 0 for e in o[0].entropies)
