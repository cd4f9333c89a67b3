"""Run under torchrun by tests/test_data_parallel.py: a tiny training run as 2 ranks, straight through,
stopped after step 2 (with a checkpoint), or resumed from it. Usage: dp_train_worker.py OUT_DIR PROMPTS MODE."""
import sys

from forkrl.config import build_config
from forkrl.train import Trainer


def main(out: str, prompts: str, mode: str) -> None:
    cfg = build_config({
        "output_dir": out, "seed": 0, "model": {"name": "tiny-random"},
        "task": {"source": "file", "train_path": prompts, "eval_size": 4,
                 "rewards": [{"function": "tests.rewards:low_token_ids"}]},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 8},
        "train": {"steps": 4, "lr": 1e-2, "micro_batch_size": 4, "checkpoint_every": 2, "mini_batches": 2},
        "algo": {"kl_coef": 0.01}, "eval": {"at_start": False}, "log": {"progress": False, "tensorboard": False}})
    trainer = Trainer(cfg)
    if mode == "stop":
        trainer.loop.on_step.append(lambda loop, step, metrics: step == 2 and loop.request_stop())
        try:
            trainer.train()
        except KeyboardInterrupt:
            pass
    else:
        trainer.train(resume=mode == "resume")
    trainer.dp.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
