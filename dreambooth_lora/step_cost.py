"""The work of one training step, and how many CPU threads a step of that size gets.

`step_flops` counts a step's FLOPs with torch.utils.flop_counter on the meta device (no weights, no memory): the
speed bench divides by it for the MFU. Counting takes 0.4-1.7 s even for a toy UNet, which a 12 s run would feel,
so the thread choice reads a proxy instead: the UNet's weights times the latent positions of one row (`step_size`).

Why a small step runs on one thread (README "Speed", measured on this project's 2-core CPU): a step of the
sd15-toy UNet at 64 px (2.4 M weights x 8x8 latents; 0.26 GFLOP counted) takes 71-77 ms on 2 threads and 77-81 ms
on 1 when nothing else runs, but inside a trainer on a machine where anything else wants a core, OpenMP's 2
spinning threads stall on every one of a step's ~1,900 small ops: six 30-step runs on 2 threads gave 9.6-13.5
steps/s, six on 1 thread 12.5-15.1. At 128 px (1.2 GFLOP) a second thread pays clearly (108-114 against 134-136
ms; at 256 px 542 against 852-866 ms), so larger steps keep torch's default thread count.
"""

from __future__ import annotations

# steps under this size (weights x latent positions) run on one thread: sd15-toy at 64 px is 1.6e8, at 128 px 6.3e8
ONE_THREAD_BELOW = 3e8


def step_flops(unet_config: dict, rank: int, latent_size: int, batch: int) -> float:
    """FLOPs of one training step (the UNet with rank-`rank` LoRA, forward and backward, `batch` rows at
    `latent_size`²), counted on the meta device."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from .lora import attach_unet_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        unet.requires_grad_(False)
        attach_unet_lora(unet, rank, float(rank))
        latents = torch.randn(batch, unet_config["in_channels"], latent_size, latent_size)
        hidden = torch.randn(batch, 77, unet_config["cross_attention_dim"])
        timesteps = torch.zeros(batch, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            unet(latents, timesteps, hidden).sample.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def step_size(unet, latent_size: int) -> float:
    """The proxy for a step's work that picks its threads: the UNet's weights times one row's latent positions."""
    return float(sum(p.numel() for p in unet.parameters())) * latent_size * latent_size


def cpu_threads(asked: int | None, size: float, default: int) -> int:
    """The threads a CPU training step runs on: `asked` when given (--cpu-threads), else one for a step under
    ONE_THREAD_BELOW (`step_size`) and torch's `default` otherwise."""
    if asked:
        return asked
    return 1 if size < ONE_THREAD_BELOW else default
