"""Cold-start SFT: assistant-only masks, batching without leaks, learning, schedules, demonstrations."""
import json
import math

import pytest
import torch

from forkrl.config import build_config
from forkrl.tasks.conversations import load_conversations, render_conversation
from forkrl.tasks.demos import arithmetic_episode
from forkrl.train import Trainer
from forkrl.train.trainer import lr_lambda


class CharChatTokenizer:
    """One token per character; the template writes `role:content|` per message and `A:` as the prompt."""
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        text = "".join(f"{m['role'][0].upper()}:{m['content']}|" for m in messages) + ("A:" if add_generation_prompt else "")
        return [ord(c) for c in text]


CONV = [{"role": "system", "content": "S"}, {"role": "user", "content": "1+6?"},
        {"role": "assistant", "content": "<python>1+6</python>"}, {"role": "tool", "content": "7"},
        {"role": "assistant", "content": "7"}]


def test_assistant_only_mask_by_hand():
    prompt, tokens, mask = render_conversation(CONV, CharChatTokenizer())
    assert "".join(map(chr, prompt)) == "S:S|U:1+6?|A:"
    call, obs, answer = "<python>1+6</python>", "\n<result>\n7\n</result>\n", "7"
    assert tokens == [ord(c) for c in call + obs + answer] + [0]
    assert mask == [1] * len(call) + [0] * len(obs) + [1] * len(answer) + [1]   # the end-of-turn token trains


def test_real_template_spans_decode_to_the_assistant_text():
    from forkrl.models import load_policy
    _, tok = load_policy("tiny-random")
    _, tokens, mask = render_conversation(CONV, tok)
    trained = tok.decode([t for t, m in zip(tokens, mask) if m])
    masked = tok.decode([t for t, m in zip(tokens, mask) if not m])
    assert trained == "<python>1+6</python>7<|im_end|>"
    assert masked == "\n<result>\n7\n</result>\n"


@pytest.mark.parametrize("messages, error", [
    ([{"role": "user", "content": "hi"}], "at least one assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
     "must be system/user"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"},
      {"role": "assistant", "content": "b"}], "split multi-round"),
])
def test_bad_conversations_are_refused(messages, error):
    with pytest.raises(ValueError, match=error):
        render_conversation(messages, CharChatTokenizer())


def test_bad_row_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CONV}) + "\n" + json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(ValueError, match="d.jsonl:2: a row needs a 'messages' list"):
        load_conversations(path, CharChatTokenizer())


def _demo_file(tmp_path, n=8):
    rows = [{"messages": [{"role": "user", "content": f"Say the word number {i}."},
                          {"role": "assistant", "content": f"word{i} " * (1 + i % 3)}]} for i in range(n)]
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path, **train):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(6)))
    return build_config({
        "output_dir": str(tmp_path / "run"), "model": {"name": "tiny-random"},
        "task": {"source": "file", "train_path": str(prompts), "eval_size": 2},
        "sft": {"train_path": _demo_file(tmp_path), "batch_size": 4},
        "algo": {"loss": "nll"}, "train": {"steps": 30, "lr": 1e-2, **train},
        "eval": {"at_start": False}, "log": {"progress": False, "tensorboard": False}})


def test_sft_on_tiny_random_memorises_its_data(tmp_path):
    trainer = Trainer(_cfg(tmp_path))
    trainer.train()
    nll = [m["sft/nll"] for m in trainer.history]
    assert nll[-1] < 0.25 * nll[0], nll


def test_a_batch_does_not_leak_between_conversations(tmp_path):
    """Each conversation's log-probs in a padded batch equal those computed alone."""
    from forkrl.train.learner import pack, response_logprobs
    trainer = Trainer(_cfg(tmp_path))
    batch = trainer.source.next_batch(1).trajectories
    with torch.no_grad():
        together, _ = response_logprobs(trainer.model, pack(batch, trainer.engine.pad_id))
        for i, t in enumerate(batch):
            alone, _ = response_logprobs(trainer.model, pack([t], trainer.engine.pad_id))
            n = alone.shape[1]
            assert torch.allclose(together[i, :n], alone[0], atol=1e-5)


def test_length_grouped_batches_cover_every_conversation_once_per_epoch(tmp_path):
    trainer = Trainer(_cfg(tmp_path))
    seen = [t.group for s in (1, 2) for t in trainer.source.next_batch(s).trajectories]   # 8 conversations, batches of 4
    assert len(seen) == 8 and len(set(seen)) == 8
    lengths = [len(t.tokens) for t in Trainer(_cfg(tmp_path)).source.next_batch(1).trajectories]
    assert lengths == sorted(lengths)   # one window of 8 x batch: sorted before it is cut


def test_lr_schedules_by_hand():
    cfg = build_config({"train": {"steps": 10, "warmup_steps": 2, "schedule": "cosine", "min_lr_ratio": 0.1}})
    f = lr_lambda(cfg.train)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    cfg.train.schedule = "linear"
    assert lr_lambda(cfg.train)(6) == pytest.approx(0.1 + 0.9 * 0.5)
    cfg.train.schedule = "constant"
    assert lr_lambda(cfg.train)(9) == 1.0


def test_rule_based_arithmetic_demonstration():
    ep = arithmetic_episode("State the final answer to the following arithmetic problem: 141 - 365 =", "-224")
    assert ep == [{"role": "assistant", "content": "<python>print(141 - 365)</python>"},
                  {"role": "tool", "content": "-224"}, {"role": "assistant", "content": "-224"}]
    with pytest.raises(ValueError, match="task says"):
        arithmetic_episode("What is 2 + 2 =", "5")


def test_cli_requires_the_right_command(tmp_path, capsys):
    from forkrl.cli import main
    assert main(["sft", "configs/quickstart.yaml", "model.name=tiny-random"]) == 2
    assert "needs sft.train_path" in capsys.readouterr().err
    assert main(["train", "configs/sft_tools.yaml", "model.name=tiny-random"]) == 2
    assert "forkrl sft" in capsys.readouterr().err


def test_rl_starts_from_the_sft_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, steps=2)
    summary = Trainer(cfg).train()
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(summary["export"])   # plain transformers loads it
    rl = build_config({"output_dir": str(tmp_path / "rl"), "model": {"name": summary["export"]},
                       "task": cfg.task.model_dump(), "train": {"steps": 1},
                       "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 4},
                       "eval": {"at_start": False}, "log": {"progress": False, "tensorboard": False}})
    trainer = Trainer(rl)
    first = next(trainer.model.parameters())
    assert torch.equal(first, next(exported.parameters()))
    trainer.train()
