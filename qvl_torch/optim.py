"""AdamW and the learning-rate schedule of the PyTorch trainer, built to match `qvl_jax.state.make_optimizer`
step for step: decay on matrices only, per-part peak rates (`qvl_core.parts`), linear warm-up from 0, then
cosine / linear decay or constant."""

from __future__ import annotations

import math

import torch

from qvl_core import parts


def lr_multiplier(t, total_steps: int):
    """optax's schedules as a LambdaLR multiplier of the update count (0-based)."""
    warmup = min(t.warmup_steps, max(total_steps - 1, 0))
    end = t.min_lr_ratio

    def cosine(step: int) -> float:
        if step < warmup:
            return step / warmup
        decay = max(total_steps, warmup + 1) - warmup
        frac = min(step - warmup, decay) / decay
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * frac))

    def joined(after):
        def f(step: int) -> float:
            if warmup and step < warmup:
                return step / warmup
            return after(step - warmup)
        return f

    if t.lr_schedule == "cosine":
        return cosine
    if t.lr_schedule == "constant":
        return joined(lambda _s: 1.0)
    span = max(total_steps - warmup, 1)
    return joined(lambda s: 1.0 + (end - 1.0) * min(s, span) / span)


def make_optimizer(model: torch.nn.Module, config, total_steps: int):
    """(AdamW over the parameters that train, its LambdaLR). Freezes the rest (`requires_grad=False`)."""
    t = config.training
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        p.requires_grad_(parts.key_trains(name, config.model))
        if p.requires_grad:
            groups.setdefault((parts.learning_rate(name, t), p.ndim > 1), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": t.weight_decay if decays else 0.0}
                    for (lr, decays), ps in sorted(groups.items())]
    optimizer = torch.optim.AdamW(param_groups, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(t, total_steps))
    return optimizer, scheduler
