"""Latent Preference Optimization (Dhuliawala et al., 2024) for a temperature head: pure math.

For each prompt, N responses are sampled with temperatures drawn from the current head and
scored by a reward. The best and the worst form a preference pair over the *temperatures*
that produced them (one per reply at example level, one per token at token level). With a
uniform reference distribution the DPO-style loss reduces to::

    -log σ(β · [log P(τ_chosen) − log P(τ_rejected)])

where ``log P(τ)`` sums the head's log-probabilities of each temperature choice. The policy
stays frozen; only the head learns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from ttalign.engine.temperature_head import TemperatureHead


@dataclass(frozen=True)
class Sample:
    """One sampled response: its reward, its hidden states (one row per temperature choice)
    and the index of the temperature used at each of those rows."""

    reward: float
    features: torch.Tensor  # (choices, hidden)
    choices: torch.Tensor  # (choices,) long


@dataclass(frozen=True)
class PreferencePair:
    chosen: Sample
    rejected: Sample


def preference_pair(samples: Sequence[Sample]) -> PreferencePair | None:
    """Best against worst; ``None`` when every reward ties (no preference to learn).

    Among equal rewards the earliest sample wins, so the pair is deterministic.
    """
    if len(samples) < 2:
        return None
    best = max(range(len(samples)), key=lambda i: (samples[i].reward, -i))
    worst = min(range(len(samples)), key=lambda i: (samples[i].reward, i))
    if samples[best].reward == samples[worst].reward:
        return None
    return PreferencePair(samples[best], samples[worst])


def sequence_log_prob(head: nn.Module, sample: Sample) -> torch.Tensor:
    """``log P(τ)``: the sum over the sample's choices of the head's log-probability."""
    log_probs = torch.log_softmax(head(sample.features), dim=-1)
    return log_probs.gather(1, sample.choices[:, None]).sum()


def lpo_loss(
    chosen_log_prob: torch.Tensor, rejected_log_prob: torch.Tensor, beta: float
) -> torch.Tensor:
    """The LPO loss of pairs with a uniform reference: the mean of
    ``-log σ(β (log P(τ_c) − log P(τ_r)))``."""
    return -nn.functional.logsigmoid(beta * (chosen_log_prob - rejected_log_prob)).mean()


def pair_losses(head: nn.Module, pairs: Sequence[PreferencePair], beta: float) -> torch.Tensor:
    chosen = torch.stack([sequence_log_prob(head, p.chosen) for p in pairs])
    rejected = torch.stack([sequence_log_prob(head, p.rejected) for p in pairs])
    return lpo_loss(chosen, rejected, beta)


@dataclass(frozen=True)
class TrainingReport:
    #: The epoch kept (the one with the lowest validation loss, or the last).
    epochs: int
    train_loss: float
    validation_loss: float | None
    #: Fraction of validation pairs where the head prefers the chosen temperatures.
    validation_accuracy: float | None


def fit_head(
    head: TemperatureHead,
    train: Sequence[PreferencePair],
    validation: Sequence[PreferencePair],
    *,
    beta: float,
    epochs: int,
    learning_rate: float,
    seed: int,
) -> TrainingReport:
    """Train ``head`` on ``train`` with Adam (feature standardization set from the data)."""
    torch.manual_seed(seed)
    features = torch.cat([s.features for p in train for s in (p.chosen, p.rejected)])
    head.feature_mean.copy_(features.mean(0))
    head.feature_scale.copy_(features.std(0).clamp_min(1e-4))
    optimizer = torch.optim.Adam(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    order = list(range(len(train)))
    generator = torch.Generator().manual_seed(seed)
    best_loss, best_state, best_epoch = float("inf"), None, epochs
    for epoch in range(1, epochs + 1):
        head.train()
        permutation = torch.randperm(len(order), generator=generator).tolist()
        for start in range(0, len(permutation), 16):
            batch = [train[i] for i in permutation[start : start + 16]]
            optimizer.zero_grad()
            pair_losses(head, batch, beta).backward()
            optimizer.step()
        if validation:
            # Early stopping: keep the epoch whose held-out pairs the head explains best.
            head.eval()
            with torch.no_grad():
                held_out = float(pair_losses(head, validation, beta))
            if held_out < best_loss:
                best_loss, best_epoch = held_out, epoch
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    with torch.no_grad():
        train_loss = float(pair_losses(head, train, beta)) if train else float("nan")
        if not validation:
            return TrainingReport(best_epoch, train_loss, None, None)
        margins = torch.stack(
            [
                sequence_log_prob(head, p.chosen) - sequence_log_prob(head, p.rejected)
                for p in validation
            ]
        )
        return TrainingReport(
            best_epoch,
            train_loss,
            float(lpo_loss(margins, torch.zeros_like(margins), beta)),
            float((margins > 0).float().mean()),
        )
