"""The optimizer of every run: AdamW or SGD with linear warm-up then cosine decay."""

from __future__ import annotations

import optax


def make_optimizer(name: str, *, learning_rate: float, total_steps: int, warmup_steps: int = 0,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW (default) or SGD with linear warm-up then cosine decay to 10% of the peak."""
    if learning_rate <= 0:
        raise ValueError(f"spec.training.learningRate must be > 0 (got {learning_rate})")
    warmup = max(0, min(warmup_steps, total_steps - 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=0.1 * learning_rate)
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=weight_decay)
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(schedule))
    raise ValueError(f"spec.training.optimizer: must be adamw or sgd (got {name!r})")
