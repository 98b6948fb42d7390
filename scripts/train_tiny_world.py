#!/usr/bin/env python
"""Train builtin:tiny-world from scratch and write it into the package (resumable; GPU if present).

    python scripts/train_tiny_world.py --work tw_work --out dreambooth_lora/builtin/tiny-world
    python scripts/train_tiny_world.py --cpu-budget   # sized for 2 CPU cores, run in the background
    # stage 2 (what ships): continue stage 1's UNet and text encoder on more two-colour objects
    python scripts/train_tiny_world.py --work tw2 --init-from <stage-1 folder> --solid-share 0.4 \
        --unet-batch 2048 --warmup 200 --unet-steps 3338
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dreambooth_lora.bench.base_model import BaseTrainConfig, prompt_following, train_base_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="tw_work", help="checkpoint folder (resume by running again)")
    parser.add_argument("--out", default="dreambooth_lora/builtin/tiny-world")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset-size", type=int)
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--unet-steps", type=int)
    parser.add_argument("--unet-batch", type=int)
    parser.add_argument("--vae-batch", type=int)
    parser.add_argument("--unet-lr", type=float)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--solid-share", type=float, help="share of one-colour objects in the data (default 0.7)")
    parser.add_argument("--init-from", help="continue from this tiny-world folder (keeps its VAE)")
    parser.add_argument("--minutes", type=float, help="time budget for the UNet phase")
    parser.add_argument("--vae-minutes", type=float, help="time budget for the VAE phase")
    parser.add_argument("--cpu-budget", action="store_true", help="sizes that fit 2 CPU cores in about an hour")
    parser.add_argument("--eval-per-prompt", type=int, default=16)
    parser.add_argument("--log", default=None, help="also append JSON lines here")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    config = BaseTrainConfig()
    if args.cpu_budget:
        config = replace(config, dataset_size=60_000, vae_steps=1500, vae_batch=64, unet_steps=8000, unet_batch=64, minutes=45)
    overrides = {k: v for k, v in dict(dataset_size=args.dataset_size, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                                        unet_batch=args.unet_batch, vae_batch=args.vae_batch, minutes=args.minutes,
                                        vae_minutes=args.vae_minutes, unet_lr=args.unet_lr,
                                        warmup=args.warmup, init_from=args.init_from, solid_share=args.solid_share).items() if v is not None}
    config = replace(config, **overrides)
    log_file = open(args.log, "a") if args.log else None

    def log(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    log({"config": config.__dict__, "device": str(device), "torch": torch.__version__})
    started = time.time()
    model = train_base_model(config, Path(args.work), Path(args.out), device, log)
    log({"phase": "trained", "minutes": round((time.time() - started) / 60, 2)})
    if args.eval_per_prompt:
        log({"phase": "eval", **prompt_following(model, per_prompt=args.eval_per_prompt, device=device)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
