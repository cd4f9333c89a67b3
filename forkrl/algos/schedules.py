"""Step schedules of method coefficients (SPEAR's replay weight and tool-call reward, algorithms.md §13.4)."""
from __future__ import annotations

import math


def cosine_ramp(step: int, steps: int, top: float) -> float:
    """0 at step 0, `top` from `steps` on, a half cosine in between."""
    p = min(max(step / max(steps, 1), 0.0), 1.0)
    return top * 0.5 * (1 - math.cos(math.pi * p))


def cosine_decay(step: int, steps: int, top: float) -> float:
    """`top` at step 0, 0 from `steps` on (SPEAR's tool-call reward coefficient)."""
    return top - cosine_ramp(step, steps, top)
