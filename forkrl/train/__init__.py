"""Training: the one training loop (`Loop`), the run's assembly (`Trainer`), the learner and
exact-resume checkpoints."""
from forkrl.train.learner import Learner, NonFiniteLoss, pack, response_logprobs
from forkrl.train.loop import Loop
from forkrl.train.trainer import Trainer

__all__ = ["Learner", "Loop", "NonFiniteLoss", "Trainer", "pack", "response_logprobs"]
