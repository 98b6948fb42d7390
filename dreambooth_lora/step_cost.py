"""The work of one training step, and how many CPU threads a step of that size gets.

`step_flops` counts a step's FLOPs with torch.utils.flop_counter on the meta device (no weights, no memory): the
speed bench divides by it for the MFU, and training on the CPU uses it to pick its threads.

Why a small step runs on one thread (README "Speed", measured on this project's 2-core CPU): a step of the
sd15-toy UNet at 64 px (0.22 GFLOP) takes 71-77 ms on 2 threads and 77-81 ms on 1 when nothing else runs, but
inside a trainer on a machine where anything else wants a core, OpenMP's 2 spinning threads stall on every one of
a step's ~1,900 small ops: six 30-step runs on 2 threads gave 9.6-13.5 steps/s, six on 1 thread 12.5-15.1. From
0.8 GFLOP a step (the same UNet at 128 px) a second thread pays clearly (108-114 against 134-136 ms; at 256 px 542
against 852-866 ms), so larger steps keep torch's default thread count.
"""

from __future__ import annotations

ONE_THREAD_BELOW_FLOPS = 0.5e9  # steps under this run on one thread (module docstring)


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


def cpu_threads(asked: int | None, flops: float, default: int) -> int:
    """The threads a CPU training step runs on: `asked` when given (--cpu-threads), else one for a step under
    ONE_THREAD_BELOW_FLOPS and torch's `default` otherwise."""
    if asked:
        return asked
    return 1 if flops < ONE_THREAD_BELOW_FLOPS else default
