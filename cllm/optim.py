"""AdamW over the flat parameter buffer, global-norm clipping, and the warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math

from ._kernels import adamw
from .buffers import aligned_zeros


class AdamW:
    """AdamW (decoupled weight decay, bias-corrected) with weight decay on the matrices only.

    The model's flat layout puts every matrix first, so decay applies to params[:model.n_decay].
    """

    def __init__(self, model, *, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.m = aligned_zeros(model.params.size)
        self.v = aligned_zeros(model.params.size)
        self.step_count = 0

    def grad_norm(self) -> float:
        return math.sqrt(adamw.grad_sq_norm(self.model.grads, threads=self.model.threads))

    def step(self, *, lr: float | None = None, max_grad_norm: float | None = None) -> float:
        """Clips the gradient to max_grad_norm (if given), applies one update, returns the pre-clip norm.

        A non-finite gradient norm raises instead of silently poisoning the parameters.
        """
        norm = self.grad_norm()
        if not math.isfinite(norm):
            raise FloatingPointError(f"gradient norm is {norm} at step {self.step_count + 1}")
        scale = 1.0
        if max_grad_norm is not None and max_grad_norm > 0 and norm > max_grad_norm:
            scale = max_grad_norm / (norm + 1e-6)
        self.step_count += 1
        adamw.adamw_step(self.model.params, self.model.grads, self.m, self.v,
                         lr=self.lr if lr is None else lr, beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                         weight_decay=self.weight_decay, step=self.step_count, n_decay=self.model.n_decay,
                         grad_scale=scale, threads=self.model.threads)
        return norm


def cosine_lr(step: int, *, max_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warmup over `warmup` steps to max_lr, then cosine decay to min_lr at `total`. step counts from 0."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
