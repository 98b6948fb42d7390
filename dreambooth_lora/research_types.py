"""Adapter types stored as exact LoRA factors: QR-LoRA, VeRA (a handful of learned vectors) and AdaLoRA.

QR-LoRA (arXiv 2508.21810; PEFT has none): per targeted Linear, a column-pivoted QR of the frozen weight,
W0 P = Q R; keep the first r columns of Q (by |R_ii|, which pivoting makes decreasing) and learn only
delta W = Q_r diag(lambda) R_r P^T = Q_r diag(lambda) Q_r^T W0 (R = Q^T W0 P). lambda starts at 0: step 0 is the
base model. VeRA (PEFT `VeraConfig`): frozen shared random A, B and learned vectors, delta W = (Lb B)(Ld A).
AdaLoRA (PEFT `AdaLoraConfig`): delta W = B (A * E) alpha / r, an SVD-like P Lambda Q whose rank budget PEFT's rank
allocator moves between layers each step (`update_and_allocate`), with its orthogonality term added here (PEFT
adds it only to a model output with `.loss`, which the UNet's has not).

Both deltas are exact rank-r products, so the adapter file stores them as plain LoRA layers (down [r, in],
up [out, r], alpha = r, scale 1) with the type in the metadata: generation, mixing and the formats work on them
unchanged (docs/DESIGN.md, "Adapter types").
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .adapter_types import LoRA

RESEARCH_TYPES = ("qrlora", "vera", "adalora")
QRLORA_MARKER = "qrlora"  # the parameter-name part of QR-LoRA's lambdas: `<module>.qrlora.lam`
VERA_MARKER = "vera_lambda"
ADAPTER_NAME_DEFAULT = "default"  # lora.ADAPTER_NAME (not imported: lora.py imports this module)


# ----- QR-LoRA -----

def pivoted_qr(weight: torch.Tensor, rank: int | None = None, energy: float | None = None):
    """Column-pivoted QR (Businger-Golub, written here: torch.linalg.qr has no pivoting and scipy is not a dependency),
    stopped at `rank` columns, or at the fewest whose |R_ii|^2 hold `energy` of the full decomposition's.

    Returns (Q_r [out, r], R_r P^T = Q_r^T W [r, in], |R_ii| [r]), all fp64. Each step takes the residual column of
    largest norm as the next pivot (that norm is |R_ii|) and removes its direction from every column; the direction
    is orthogonalised twice against the kept ones so Q stays orthonormal in fp64."""
    residual = weight.detach().to(torch.float64).clone()
    full = min(residual.shape)
    steps = full if energy is not None else min(rank, full)
    columns, diagonal = [], []
    first = residual.norm(dim=0).max()
    for _ in range(steps):
        norms = residual.norm(dim=0)
        pivot = int(norms.argmax())
        if norms[pivot] <= 1e-12 * first:  # W has no further rank: more columns would be noise
            break
        q = residual[:, pivot] / norms[pivot]
        for _ in range(2):
            if columns:
                kept = torch.stack(columns, dim=1)
                q = q - kept @ (kept.T @ q)
        q = q / q.norm()
        columns.append(q)
        diagonal.append(norms[pivot])
        residual = residual - torch.outer(q, q @ residual)
    diagonal = torch.stack(diagonal)
    if energy is not None:
        share = torch.cumsum(diagonal**2, 0) / (diagonal**2).sum()
        keep = int((share < energy - 1e-12).sum()) + 1
        keep = min(keep, len(columns))
    else:
        keep = len(columns)
    q_r = torch.stack(columns[:keep], dim=1)
    return q_r, q_r.T @ weight.detach().to(torch.float64), diagonal[:keep]


class QRLoRA(nn.Module):
    """One Linear's QR-LoRA: frozen Q_r and R_r P^T, the learned lambda (r values, zero at init)."""

    def __init__(self, weight: torch.Tensor, rank: int | None, energy: float | None):
        super().__init__()
        q, down, _ = pivoted_qr(weight, rank, energy)
        self.register_buffer("q", q.float(), persistent=False)
        self.register_buffer("down", down.float(), persistent=False)
        self.lam = nn.Parameter(torch.zeros(q.shape[1]))
        self.enabled = True

    def hook(self, module, inputs, output):
        if not self.enabled:
            return output
        x = inputs[0]
        return output + nn.functional.linear(nn.functional.linear(x, self.down.to(x.dtype)) * self.lam.to(x.dtype),
                                             self.q.to(x.dtype))

    def factors(self) -> LoRA:
        """The exact LoRA layer: down = R_r P^T, up = Q_r diag(lambda), alpha = r (scale 1)."""
        lam = self.lam.detach().float().cpu()
        return LoRA(self.down.float().cpu().contiguous(), (self.q.float().cpu() * lam).contiguous(), float(lam.numel()))


def targeted_linears(model, targets: list[str]) -> dict[str, nn.Linear]:
    """The Linear modules whose path ends in a target name, as PEFT's target_modules matches them."""
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and any(name == t or name.endswith("." + t) for t in targets)}


def attach_qrlora(unet, rank: int, targets: list[str], energy: float | None = None) -> int:
    """QR-LoRA on every targeted Linear (a child `qrlora` and a forward hook); returns the number of lambdas."""
    total = 0
    for name, linear in targeted_linears(unet, targets).items():
        layer = QRLoRA(linear.weight, rank, energy).to(linear.weight.device)
        linear.qrlora = layer  # a child module: it moves with the UNet and its lambda is `<name>.qrlora.lam`
        linear.register_forward_hook(layer.hook)
        total += layer.lam.numel()
    return total


def qrlora_layers(unet) -> dict[str, QRLoRA]:
    return {name.removesuffix(".qrlora"): m for name, m in unet.named_modules() if isinstance(m, QRLoRA)}


# ----- VeRA -----

def vera_config(rank: int, targets: list[str]):
    """PEFT's VeRA: one shared random pair (key 0) saved with the adapter; lambda_b = 0 at init, so the start is the base."""
    from peft import VeraConfig

    return VeraConfig(r=rank, target_modules=targets, projection_prng_key=0, save_projection=True, vera_dropout=0.0)


def vera_layers(unet) -> dict:
    from peft.tuners.vera.layer import VeraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, VeraLayer)}


def vera_factors(layer, adapter_name: str) -> LoRA:
    """PEFT's delta (Lb B_sliced)(Ld A_sliced) as LoRA factors: up = Lb B, down = Ld A, alpha = r (scale 1)."""
    a = layer.vera_A[adapter_name][:, : layer.in_features].detach().float().cpu()
    b = layer.vera_B[adapter_name][: layer.out_features, :].detach().float().cpu()
    lambda_d = layer.vera_lambda_d[adapter_name].detach().float().cpu()
    lambda_b = layer.vera_lambda_b[adapter_name].detach().float().cpu()
    return LoRA((lambda_d[:, None] * a).contiguous(), (lambda_b[:, None] * b).contiguous(), float(a.shape[0]))


# ----- AdaLoRA -----

ADALORA_ORTH_WEIGHT = 0.5  # PEFT's default orth_reg_weight
ADALORA_INIT_FACTOR = 1.5  # start at 1.5 x the target average rank, as PEFT's defaults (init_r 12, target_r 8)


def attach_adalora(unet, rank: int, alpha: float, steps: int, targets: list[str]):
    """AdaLoRA on the UNet; returns PEFT's tuner, whose `update_and_allocate(step)` must follow every optimizer step.

    Budget schedule over the run: full rank for the first tenth (tinit), shrinking to `rank` on average, fixed for
    the last fifth (tfinal); PEFT requires tinit < total_step - tfinal."""
    import math

    from peft import AdaLoraConfig
    from peft.tuners.adalora import AdaLoraModel

    tinit, tfinal = (steps // 10, steps // 5) if steps >= 5 else (0, 0)
    config = AdaLoraConfig(target_r=rank, init_r=math.ceil(ADALORA_INIT_FACTOR * rank), lora_alpha=alpha,
                           total_step=steps, tinit=tinit, tfinal=tfinal, deltaT=1, target_modules=targets,
                           orth_reg_weight=ADALORA_ORTH_WEIGHT, lora_dropout=0.0)
    return AdaLoraModel(unet, config, ADAPTER_NAME_DEFAULT)


def adalora_orthogonality(unet) -> torch.Tensor:
    """PEFT's AdaLoraModel.forward term: the mean over A and B of ||A A^T - I||_F and ||B^T B - I||_F, times its weight."""
    terms = []
    for name, param in unet.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and param.requires_grad and param.numel():
            cov = param @ param.T if "lora_A" in name else param.T @ param
            terms.append(torch.norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device), p="fro"))
    return ADALORA_ORTH_WEIGHT * torch.stack(terms).mean()


def adalora_factors(layer, adapter_name: str) -> LoRA:
    """B (A * E) s / (ranknum + 1e-5) as LoRA factors; ranks the allocator pruned (E = 0) are dropped exactly."""
    e = layer.lora_E[adapter_name].detach().float().cpu().reshape(-1)
    kept = (e != 0).nonzero().reshape(-1)
    if kept.numel() == 0:
        kept = torch.tensor([0])  # an all-pruned layer: one zero rank, so the file still has the layer
    scale = layer.scaling[adapter_name] / (float(layer.ranknum[adapter_name]) + 1e-5)
    down = (layer.lora_A[adapter_name].detach().float().cpu() * e[:, None])[kept]
    up = layer.lora_B[adapter_name].detach().float().cpu()[:, kept] * scale
    return LoRA(down.contiguous(), up.contiguous(), float(kept.numel()))


# ----- all three: state for checkpoints, LoRA factors for the file, switching off -----

def research_kind(unet) -> str | None:
    """Which of these types the UNet carries, if any."""
    from peft.tuners.adalora import AdaLoraLayer

    if qrlora_layers(unet):
        return "qrlora"
    if vera_layers(unet):
        return "vera"
    return "adalora" if any(isinstance(m, AdaLoraLayer) for m in unet.modules()) else None


def unet_lora_layers(unet, kind: str, adapter_name: str) -> dict[str, LoRA]:
    """The trained UNet layers as exact LoRA layers keyed `unet.<module>` (the adapter file's keys)."""
    if kind == "qrlora":
        return {f"unet.{name}": layer.factors() for name, layer in qrlora_layers(unet).items()}
    if kind == "adalora":
        from peft.tuners.adalora import AdaLoraLayer

        return {f"unet.{name}": adalora_factors(m, adapter_name) for name, m in unet.named_modules()
                if isinstance(m, AdaLoraLayer)}
    return {f"unet.{name}": vera_factors(layer, adapter_name) for name, layer in vera_layers(unet).items()}


def trained_state(unet, kind: str) -> dict[str, torch.Tensor]:
    """The learned vectors by parameter name (checkpoints and meter points hold these, not the LoRA factors)."""
    marker = {"qrlora": QRLORA_MARKER, "vera": VERA_MARKER, "adalora": "lora_"}[kind]
    return {f"unet.{name}": p.detach().to("cpu", torch.float32).clone() for name, p in unet.named_parameters()
            if marker in name and p.requires_grad}


def load_trained_state(unet, kind: str, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            name = key.removeprefix("unet.")
            if key.startswith("unet.") and name in params:
                params[name].copy_(value)


@contextmanager
def qrlora_disabled(module):
    layers = [m for m in module.modules() if isinstance(m, QRLoRA)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True
