"""Resumable training checkpoints in safetensors (no pickle): LoRA weights, optimizer state, RNG, step."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .faults import fault_point
from .paths import atomic_path


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, step: int, losses: list[float],
                    extras: dict[str, torch.Tensor] | None = None) -> None:
    """Write everything needed to continue at `step` (`extras`: other state, e.g. the weight average); atomic, so a
    crash keeps the previous one."""
    state = optimizer.state_dict()
    flat = {f"weights.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
    flat.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extras or {}).items()})
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            flat[f"optim.{index}.{key}"] = value.detach().cpu().contiguous()
    flat["rng"] = generator.get_state()
    header = {"step": str(step), "losses": json.dumps(losses), "param_groups": json.dumps(state["param_groups"])}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=header)
        fault_point("checkpoint")  # written under its temporary name, not yet renamed over the previous one


def load_checkpoint(path: Path, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    extras: dict | None = None) -> tuple[dict, int, list[float]]:
    """Restore optimizer and RNG in place; return the LoRA tensors, the step reached and the losses so far (and put
    the saved extras into `extras`)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        header = handle.metadata()
        flat = {key: handle.get_tensor(key) for key in handle.keys()}
    weights = {k.removeprefix("weights."): v for k, v in flat.items() if k.startswith("weights.")}
    if extras is not None:
        extras.update({k.removeprefix("extra."): v for k, v in flat.items() if k.startswith("extra.")})
    state: dict[int, dict] = {}
    for key, value in flat.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(header["param_groups"])})
    generator.set_state(flat["rng"])
    return weights, int(header["step"]), json.loads(header["losses"])


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint file continues from, or None when there is none (read from its header only)."""
    if not Path(path).exists():
        return None
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return int(handle.metadata()["step"])
