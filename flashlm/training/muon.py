"""Muon whose orthogonalisation runs in a chosen dtype.

`torch.optim.Muon` always runs its Newton-Schulz iteration in bf16, which is right on GPUs and on CPUs
with native bf16 matmuls, and slow on a CPU without them (AVX2 only), where PyTorch emulates bf16
matmuls: there the optimizer step costs more than the forward and backward passes of a small model.
`Muon` here is `torch.optim.Muon` (same constructor, defaults, state and state dict) with the iteration in
`ns_dtype`; `flashlm.training.optim` picks bf16 where the precision resolver says bf16 pays, else fp32.

The update, per 2-D parameter W with gradient G (as torch's): momentum B ← μB + (1 − μ)G; with Nesterov
U = (1 − μ)G + μB, else U = B; O = NewtonSchulz(U) (≈ the orthogonal factor of U, spectral norm about 1);
W ← W·(1 − lr·wd) − lr·s·O, s = `lr_scale` (torch's adjust_lr_fn).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def newton_schulz(
    update: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Muon (as `torch.optim.Muon`), in `dtype`."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = update.size(0) > update.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def lr_scale(shape: torch.Size, adjust_lr_fn: str | None) -> float:
    """torch's per-matrix lr factor: √max(1, rows/cols) ("original", the default), or 0.2·√max(rows, cols)
    ("match_rms_adamw", an update RMS like AdamW's)."""
    rows, cols = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(rows, cols) ** 0.5
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iteration in `ns_dtype` (torch's: bf16 always)."""

    def __init__(self, params: Any, ns_dtype: torch.dtype = torch.bfloat16, **settings: Any) -> None:
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, decay = float(group["lr"]), group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                ortho = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                param.mul_(1 - lr * decay)
                param.add_(ortho.to(param.dtype), alpha=-lr * lr_scale(param.shape, group["adjust_lr_fn"]))
        return loss


__all__ = ["Muon", "lr_scale", "newton_schulz"]
