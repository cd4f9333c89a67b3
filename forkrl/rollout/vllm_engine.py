"""VLLMEngine: generation on a GPU with vLLM, behind the same interface as `TorchEngine`.

    pip install 'forkrl[gpu]'        # vllm
    rollout.engine: vllm             # in a recipe

What it keeps from the `Engine` contract and what it cannot:
- per new token its id and log-prob: vLLM's *processed* log-probs (`logprobs_mode`), i.e. under the
  distribution at the sampling temperature, as `TorchEngine` reports them (with top_p < 1 vLLM
  reports them after top-p truncation, TorchEngine before);
- the entropy is **approximate**: vLLM returns only the top-k log-probs of each step
  (`rollout.vllm.entropy_topk`, default 20, ARPO's choice), and the entropy is summed over those
  (-Σ_top-k p log p), which leaves out the tail and so is a lower bound. `stats.entropy_topk` says so;
- prefix caching is vLLM's own (`enable_prefix_caching`); `stats.cached_tokens` is what vLLM reports
  as served from it (`num_cached_tokens`);
- stop strings end a completion and stay in its text (`include_stop_str_in_output`), as tool calls need;
- `stop_when` (APRIL) is honoured by stepping vLLM's engine and aborting the unfinished requests;
- weights: after `weights_updated()`, the next call copies the policy's weights into the running
  vLLM model (`collective_rpc` to a worker extension, LoRA merged on the fly) and resets the prefix
  cache; the engine is not restarted.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from forkrl.registry import register_engine
from forkrl.rollout.engine.sequence import eos_and_pad_ids
from forkrl.types import Completion, EngineStats, GenerationRequest


def require_vllm():
    try:
        import vllm
    except ImportError:
        raise ImportError("rollout.engine=vllm needs vLLM on a CUDA machine: pip install 'forkrl[gpu]'") from None
    if not torch.cuda.is_available():
        raise RuntimeError("rollout.engine=vllm needs a CUDA GPU; use rollout.engine=torch on this machine")
    return vllm


class WeightLoader:
    """vLLM worker extension (`worker_extension_cls`): loads Hugging Face-named tensors in place."""

    def forkrl_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        self.model_runner.model.load_weights(weights=weights)
        return len(weights)


def hf_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights under Hugging Face checkpoint names, LoRA adapters merged in."""
    if not hasattr(model, "merge_adapter"):
        return [(n, t.detach()) for n, t in model.state_dict().items()]
    model.merge_adapter()
    try:
        out = []
        for name, t in model.state_dict().items():
            if "lora_" in name:
                continue
            name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            out.append((name, t.detach().clone()))
        return out
    finally:
        model.unmerge_adapter()


def topk_entropy(top: dict) -> float:
    """-Σ p log p over the top-k log-probs vLLM returned for one step (a lower bound on the entropy)."""
    logps = torch.tensor([lp.logprob for lp in top.values()], dtype=torch.float64)
    logps = logps[torch.isfinite(logps)]
    return float(-(logps.exp() * logps).sum())


def _build_vllm(rollout, model, tokenizer, seed: int = 0):
    v = rollout.vllm
    return VLLMEngine(model, tokenizer, gpu_memory_utilization=v.gpu_memory_utilization,
                      entropy_topk=v.entropy_topk, max_model_len=v.max_model_len, dtype=v.dtype,
                      enforce_eager=v.enforce_eager, seed=seed)


@register_engine("vllm", build=_build_vllm)
class VLLMEngine:
    # no exact entropies (top-k sums) and no per-token temperature (vLLM samples each request at one T)
    supports = frozenset({"stop_when", "prefix_cache", "top_logprobs"})

    def __init__(self, model, tokenizer, *, gpu_memory_utilization: float = 0.5, entropy_topk: int = 20,
                 max_model_len: int | None = None, dtype: str = "bfloat16", enforce_eager: bool = False,
                 seed: int = 0):
        vllm = require_vllm()
        self.model, self.tokenizer, self.entropy_topk = model, tokenizer, entropy_topk
        # vLLM loads from a folder: the policy as it is now, saved once (LoRA merged)
        self._dir = tempfile.TemporaryDirectory(prefix="forkrl-vllm-")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.config.save_pretrained(self._dir.name)
        from safetensors.torch import save_file
        save_file({n: t.contiguous().cpu() for n, t in hf_weights(model)}, str(Path(self._dir.name) / "model.safetensors"))
        tokenizer.save_pretrained(self._dir.name)
        self.llm = vllm.LLM(model=self._dir.name, dtype=dtype, seed=seed, enable_prefix_caching=True,
                            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                            enforce_eager=enforce_eager, max_logprobs=max(entropy_topk, 20),
                            logprobs_mode="processed_logprobs",
                            worker_extension_cls="forkrl.rollout.vllm_engine.WeightLoader")
        self.eos_ids, self.pad_id = eos_and_pad_ids(model, tokenizer)
        self.stats = EngineStats(entropy_topk=entropy_topk)
        self._stale = False
        self._next_id = 0

    def weights_updated(self) -> None:
        self._stale = True

    def _sync(self) -> None:
        start = time.perf_counter()
        self.llm.collective_rpc("forkrl_load_weights", args=(hf_weights(self.model),))
        self.llm.reset_prefix_cache()
        self.stats.sync_seconds += time.perf_counter() - start
        self.stats.syncs += 1
        self._stale = False

    def _params(self, p, seed: int | None):
        from vllm import SamplingParams
        return SamplingParams(n=1, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_tokens,
                              stop=list(p.stop) or None, include_stop_str_in_output=True, seed=seed,
                              logprobs=max(self.entropy_topk, p.logprobs), detokenize=True)

    def generate(self, requests: list[GenerationRequest], seed: int | None = None,
                 stop_when: Callable[[list[int]], bool] | None = None) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt
        if self._stale:
            self._sync()
        start = time.perf_counter()
        engine = self.llm.llm_engine
        owner: dict[str, int] = {}
        for i, req in enumerate(requests):
            if not req.prompt_ids:
                raise ValueError("every request needs at least one prompt token")
            for _ in range(req.params.n):
                rid = str(self._next_id)
                row_seed = None if seed is None else (seed * 1_000_003 + self._next_id) % 2 ** 31
                self._next_id += 1
                engine.add_request(rid, TokensPrompt(prompt_token_ids=list(req.prompt_ids)),
                                   self._params(req.params, row_seed))
                owner[rid] = i
        latest: dict[str, object] = {}
        finished = [0] * len(requests)
        while engine.has_unfinished_requests():
            newly = False
            for out in engine.step():
                latest[out.request_id] = out
                if out.finished:
                    finished[owner[out.request_id]] += 1
                    newly = True
            if newly and stop_when is not None and stop_when(list(finished)):
                engine.abort_request([r for r in owner if not (r in latest and latest[r].finished)])
                break
        results: list[list[Completion]] = [[] for _ in requests]
        for rid, i in owner.items():
            results[i].append(self._completion(latest.get(rid), requests[i].params.logprobs))
        self.stats.seconds += time.perf_counter() - start
        return results

    def _completion(self, out, want_top: int) -> Completion:
        if out is None:  # aborted before its first token
            return Completion([], [], [], "abort", "", [] if want_top else None)
        self.stats.prefill_tokens += len(out.prompt_token_ids or []) - (out.num_cached_tokens or 0)
        self.stats.cached_tokens += out.num_cached_tokens or 0
        c = out.outputs[0]
        ids = list(c.token_ids)
        self.stats.decode_tokens += len(ids)
        steps = c.logprobs or []
        logprobs = [float(step[t].logprob) for t, step in zip(ids, steps)]
        entropies = [topk_entropy(step) for step in steps]
        top = None
        if want_top:
            top = [sorted(((t, float(lp.logprob)) for t, lp in step.items()), key=lambda x: -x[1])[:want_top]
                   for step in steps]
        if not out.finished:
            finish = "abort"
        elif c.finish_reason == "length":
            finish = "length"
        elif c.stop_reason is None or isinstance(c.stop_reason, int):
            finish = "eos"
        else:
            finish = "stop"
        body = ids[:-1] if finish == "eos" and ids and ids[-1] in self.eos_ids else ids
        text = self.tokenizer.decode(body, skip_special_tokens=False)
        return Completion(ids, logprobs, entropies, finish, text, top)
