"""Adversarial training on the input embeddings.

FGM (Miyato, Dai & Goodfellow 2017, "Adversarial training methods for semi-supervised text
classification"): one step r = epsilon * g / ||g||, g the gradient of the loss with respect to the
word embeddings of each example. PGD (Madry et al. 2018): `steps` ascent steps of size `alpha` along
the normalised gradient, each projected back into the epsilon ball. The training loss is the clean
loss plus the loss on the perturbed embeddings (Miyato et al.'s L + L_adv).

The perturbation is added to the embedding lookup's output, never to the embedding matrix, so the
weights are untouched by the attack (nothing to restore, even when a step fails half-way) and the
optimiser sees the gradients of both losses. Works under every PEFT strategy: the model is called
with `inputs_embeds`, which transformers and peft models accept in place of `input_ids`.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

METHODS = ("none", "fgm", "pgd")


def _per_example_unit(g: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1).clamp_min(1e-12)
    return g / norm.view(-1, *([1] * (g.dim() - 1)))


def _project(delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(delta.flatten(1), dim=1, keepdim=True).clamp_min(1e-12)
    scale = (epsilon / norm).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.dim() - 1)))


class EmbeddingAdversary:
    def __init__(self, method: str, epsilon: float, steps: int = 1, alpha: float | None = None):
        self.method, self.epsilon = method, epsilon
        self.steps = 1 if method == "fgm" else steps
        self.alpha = alpha if alpha is not None else epsilon / max(self.steps, 1)
        # Cost of the attack (its gradient passes and extra forwards; the adversarial loss's share of
        # the backward pass comes on top and shows in the step time).
        self.seconds, self.calls = 0.0, 0
        self.last: dict[str, float] = {}
        self.last_delta: torch.Tensor | None = None

    def training_loss(self, model: nn.Module, batch: dict, loss_fn: Callable[[Any, dict], torch.Tensor]):
        """(clean outputs, clean loss + adversarial loss)."""
        rest = {k: v for k, v in batch.items() if k != "input_ids"}
        embeds = model.get_input_embeddings()(batch["input_ids"])
        if not embeds.requires_grad:  # frozen embeddings (most PEFT strategies): attack them all the same
            embeds = embeds.detach().requires_grad_()
        outputs = model(inputs_embeds=embeds, **rest)
        clean = loss_fn(outputs, batch)

        started = time.perf_counter()
        grad = torch.autograd.grad(clean, embeds, retain_graph=True)[0]
        delta = _project(self.alpha * _per_example_unit(grad), self.epsilon)
        base = embeds.detach()
        for _ in range(self.steps - 1):
            delta = delta.detach().requires_grad_()
            ascent = loss_fn(model(inputs_embeds=base + delta, **rest), batch)
            grad = torch.autograd.grad(ascent, delta)[0]
            delta = _project(delta + self.alpha * _per_example_unit(grad), self.epsilon)
        delta = delta.detach()
        adversarial = loss_fn(model(inputs_embeds=embeds + delta, **rest), batch)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        self.last = {"clean_loss": float(clean.detach()), "adversarial_loss": float(adversarial.detach())}
        self.last_delta = delta
        return outputs, clean + adversarial

    def figures(self) -> dict[str, float]:
        return {"train/adversarial_seconds": self.seconds,
                "train/adversarial_seconds_per_step": self.seconds / self.calls if self.calls else 0.0}
