"""OLMoE's learning-rate schedule, as a function of tokens trained (not steps)."""

from __future__ import annotations

import math

from olmoe_megatron.training.config import TrainConfig


def learning_rate(train: TrainConfig, tokens: int) -> float:
    """The lr after `tokens` tokens.

    olmoe: linear from warmup_start_ratio*lr to lr over warmup_tokens; cosine from lr to
    min_lr_ratio*lr at t_max_tokens; constant min_lr_ratio*lr after.
    anneal: anneal_start_ratio*lr linearly down to 0 over anneal_tokens, then 0.
    """
    peak = train.lr
    if train.schedule == "constant":
        return peak
    if train.schedule == "anneal":
        start = train.anneal_start_ratio * peak
        return max(0.0, start * (1.0 - tokens / train.anneal_tokens))
    if tokens < train.warmup_tokens:
        start = train.warmup_start_ratio * peak
        return start + (peak - start) * tokens / train.warmup_tokens
    floor = train.min_lr_ratio * peak
    if tokens >= train.t_max_tokens:
        return floor
    progress = (tokens - train.warmup_tokens) / (train.t_max_tokens - train.warmup_tokens)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
