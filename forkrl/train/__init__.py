"""Training: the RL loop (`Trainer`), the learner and exact-resume checkpoints."""
from forkrl.train.learner import Learner, NonFiniteLoss, pack, response_logprobs
from forkrl.train.trainer import Trainer

__all__ = ["Learner", "NonFiniteLoss", "Trainer", "pack", "response_logprobs"]
