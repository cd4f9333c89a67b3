"""PPO's learned critic: a value model, its optimizer, its targets and its loss (algo.critic).

    critic = Critic(copy.deepcopy(policy_model), cfg.algo.critic, autocast=...)
    batch, metrics = critic.annotate(batch)   # old values and lambda-returns on the packed batch
    loss, metrics = critic.loss(micro, norm, agg)   # per micro-batch, beside the policy's terms
    critic.step()                           # per mini-batch, after backward

The value model is a copy of the policy's network (LoRA adapters included, when the policy has them)
with a zero scalar head (`ValueForward`), as verl initialises its critic from the actor's weights.
The formulas are `forkrl.algos.values`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from forkrl.algos.losses import AggNorm
from forkrl.algos.values import (
    episode_gae,
    explained_variance,
    first_token_mask,
    outcome_token_rewards,
    value_loss,
)
from forkrl.train.batch import PackedBatch, micro_batches
from forkrl.train.forward import ValueForward
from forkrl.train.parallel import adamw, grad_norm_value


class Critic:
    def __init__(self, model, cfg, *, autocast: bool = False, attention: str = "auto"):
        self.cfg = cfg  # CriticConfig
        self.forward = ValueForward(model, autocast=autocast, attention=attention)
        self.params = [p for p in self.forward.parameters() if p.requires_grad]
        self.optimizer = adamw(self.params, lr=cfg.lr, weight_decay=0.0)

    def warming_up(self, step: int) -> bool:
        """The first `warmup_steps` steps train the critic only (the policy is not updated)."""
        return step <= self.cfg.warmup_steps

    @torch.no_grad()
    def values(self, batch: PackedBatch, max_rows: int = 16, max_tokens: int = 4096) -> Tensor:
        """[B, L] values of every row before the update, in micro-batches of the learner's size."""
        out = torch.zeros(batch.resp_ids.shape, dtype=torch.float32)
        for idx in micro_batches(batch, torch.arange(len(batch)), max_rows, max_tokens, self.forward.spans):
            v = self.forward(batch.select(idx)).float().cpu()
            out[idx, :v.shape[1]] = v
        return out

    def annotate(self, batch: PackedBatch, max_rows: int = 16, max_tokens: int = 4096) -> tuple[PackedBatch, dict]:
        """The batch with `value_mask` (where the critic reads: every generated token, or with
        `level: action` each row's first), `old_values` there and `returns`: GAE's lambda-returns of
        each row's reward, placed on its last read position, over the rows of its episode chained in
        step order (`episode_gae`; a row outside an episode is its own). The critic's batch metrics."""
        mask = batch.loss_mask if self.cfg.level == "token" else first_token_mask(batch.loss_mask)
        values = self.values(batch, max_rows, max_tokens) * mask
        _, returns = episode_gae(outcome_token_rewards(batch.rewards, mask), values, mask, batch.episode_steps,
                                 gamma=self.cfg.gamma, lam=self.cfg.lam)
        batch.old_values, batch.returns, batch.value_mask = values, returns, mask
        m = mask > 0
        metrics = {"critic/values/mean": float(values[m].mean()) if m.any() else 0.0,
                   "critic/returns/mean": float(returns[m].mean()) if m.any() else 0.0,
                   "critic/vf_explained_var": explained_variance(values, returns, mask)}
        return batch, metrics

    def loss(self, sub: PackedBatch, norm: AggNorm, agg: str) -> tuple[Tensor, dict]:
        """The clipped value loss of the micro-batch `sub`, with the mini-batch's normalisers."""
        values = self.forward(sub).float().cpu()
        return value_loss(values, sub.old_values, sub.returns, sub.value_mask, clip=self.cfg.value_clip,
                          huber_delta=self.cfg.huber_delta, agg=agg, norm=norm)

    def step(self) -> float:
        """Clip the value model's gradient, take an optimizer step (skipped when the gradient is not
        finite) and clear it. Returns the gradient norm."""
        clip = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        gn = grad_norm_value(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if torch.isfinite(torch.tensor(gn)):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gn

    def state_dict(self) -> dict:
        """The trainable weights (the head, and the network or its adapters) and the optimizer."""
        trainable = {n: p.detach().clone() for n, p in self.forward.named_parameters() if p.requires_grad}
        return {"weights": trainable, "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.forward.named_parameters())
        with torch.no_grad():
            for n, w in state["weights"].items():
                params[n].copy_(w)
        self.optimizer.load_state_dict(state["optimizer"])
