"""Optimizers, the learning-rate schedule and lookahead: what turns gradients into weight updates."""

from __future__ import annotations

import math

import torch

# Quintic Newton-Schulz coefficients that push every singular value towards 1 within a few steps
# (Jordan et al., Muon, 2024): the result is U S' V^T with S' roughly in [0.7, 1.2], which works as well as U V^T.
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def build_optimizer(net: torch.nn.Module, cfg, precision: str = "fp32") -> torch.optim.Optimizer:
    # Weight decay on weights only: decaying biases and batch-norm scales only hurts. Batch-norm parameters
    # get their own lr scale: fast nets train BN shifts at a far higher lr than the (scale-free) convs.
    norm = {id(p) for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for p in m.parameters()}
    trainable = [p for p in net.parameters() if p.requires_grad]
    hidden = hidden_matrices(net) if cfg.optimizer == "muon" else []
    hidden_ids = {id(p) for p in hidden}
    groups = [{"params": [p for p in trainable if p.ndim > 1 and id(p) not in hidden_ids],
               "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": [p for p in trainable if p.ndim <= 1 and id(p) not in norm], "weight_decay": 0.0,
               "lr_scale": 1.0},
              {"params": [p for p in trainable if id(p) in norm], "weight_decay": 0.0,
               "lr_scale": cfg.bias_lr_scale}]
    if cfg.optimizer in ("sgd", "nesterov", "muon"):
        momentum = 0.9 if cfg.momentum is None else cfg.momentum
        nesterov = cfg.optimizer != "sgd" and momentum > 0  # without momentum, Nesterov's is plain SGD
        if cfg.optimizer != "muon":
            return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum, nesterov=nesterov)
        # Newton-Schulz in bf16 for bf16 runs (fast on recent GPUs and AMX CPUs), else fp32: bf16 is 30x slower
        # than fp32 on AVX2-only ones (2.7 s against 84 ms a step for fastnet's filters).
        optimizer = Muon(groups, lr=cfg.lr, momentum=momentum, nesterov=nesterov,
                         orthogonalize_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        optimizer.add_param_group({"params": hidden, "weight_decay": 0.0, "lr_scale": cfg.muon_lr / cfg.lr,
                                   "momentum": cfg.muon_momentum, "orthogonalize": True})
        return optimizer
    eps = {} if cfg.eps is None else {"eps": cfg.eps}
    if cfg.optimizer in ("adam", "adamw"):
        adam = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return adam(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), **eps)
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.rmsprop_rho, momentum=cfg.momentum or 0.0, **eps)


def hidden_matrices(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable conv and linear weights, except the classifier (the last linear layer): what Muon updates."""
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and m.weight.requires_grad]
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    return [m.weight for m in layers if not linears or m is not linears[-1]]


def lr_factor(cfg, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at an optimizer step: linear warm-up, then the schedule."""
    epoch = step / steps_per_epoch
    total = cfg.epochs
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        # As of the step's end, so the first step is not at 0; capped, as a warm-up of 2.5 steps would pass it.
        return min(1.0, (epoch + 1 / steps_per_epoch) / cfg.warmup_epochs)
    if cfg.schedule == "step":  # counted from the end of the warm-up, which then keeps the peak for step_size
        return cfg.step_gamma ** int((epoch - cfg.warmup_epochs) // cfg.step_size)
    length = max(total - cfg.warmup_epochs, 1e-9)
    progress = (epoch - cfg.warmup_epochs) / length
    if cfg.schedule == "linear":
        return 1 + (cfg.final_lr_fraction - 1) * min(progress, 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "onecycle":  # without a warm-up: up over the first 25%, then linearly down to 0
        peak = 0.25 if cfg.warmup_epochs == 0 else 0.0
        if progress < peak:  # as of the step's end, as the warm-up: a run of a few steps still reaches the peak
            return min(1.0, 0.04 + 0.96 * (progress + 1 / (steps_per_epoch * length)) / peak)
        return max(0.0, 1 - (progress - peak) / (1 - peak))
    return 1.0


def orthogonalize(matrix: torch.Tensor, steps: int = 3, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The nearest (semi-)orthogonal matrix, roughly: a few Newton-Schulz iterations (bf16 is precise enough)."""
    x = matrix.to(dtype)
    x = x / (x.norm() + 1e-7)  # every singular value <= 1, where the iteration converges
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(matrix.dtype)


class Muon(torch.optim.SGD):
    """Nesterov SGD, except for the groups marked `orthogonalize` (hidden conv and linear weights): their momentum,
    as an (out, in * kernel) matrix, is orthogonalized before the step, and their norm is held at sqrt(out), about
    that of a default init (Muon, as in airbench94_muon).

    Behind batch norm a weight's scale does nothing, so a fixed norm loses nothing, replaces weight decay and makes
    the lr a relative step size.
    """

    def __init__(self, params, *, orthogonalize_dtype: torch.dtype = torch.bfloat16, **sgd_options) -> None:
        super().__init__(params, **sgd_options)
        self.orthogonalize_dtype = orthogonalize_dtype  # not in the state dict: a resumed run uses its machine's

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if not group.get("orthogonalize"):
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("muon_momentum", torch.zeros_like(p.grad))
                buffer.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
                p.mul_(math.sqrt(len(p)) / p.norm())
                update = orthogonalize(update.reshape(len(p), -1), dtype=self.orthogonalize_dtype)
                p.add_(update.view_as(p), alpha=-group["lr"])
                p.grad = None  # stepped: SGD's step below skips it
        return super().step(closure)


LOOKAHEAD_EVERY = 5  # steps between two pulls of the weights to the slow weights (airbench)
LOOKAHEAD_ALPHA = 0.95**5  # the slow weights' share after a pull at the peak lr; times lr factor cubed later


class Lookahead:
    """Slow weights that follow the net's weights, and pull them back: w_slow += (1 - alpha) (w - w_slow); w = w_slow.

    With fast-moving batch-norm statistics this smooths a short, high-lr run (hlb-CIFAR10, airbench).
    """

    def __init__(self, net: torch.nn.Module, slow: list[torch.Tensor] | None = None) -> None:
        """`slow`: the slow weights of a checkpoint, to resume; by default a copy of the net's weights."""
        self.slow = slow if slow is not None else [
            t.detach().clone() for t in net.state_dict().values() if t.dtype.is_floating_point]

    @torch.no_grad()
    def step(self, net: torch.nn.Module, alpha: float) -> None:
        current = [t for t in net.state_dict().values() if t.dtype.is_floating_point]
        torch._foreach_lerp_(self.slow, current, 1 - alpha)
        torch._foreach_copy_(current, self.slow)
