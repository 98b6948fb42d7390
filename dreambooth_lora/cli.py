"""The `dreambooth-lora` command. User mistakes exit with status 2 and one sentence on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError

EXIT_USER_ERROR = 2
# Commands whose process mostly waits. OpenMP threads that spin while waiting slow every other process on the
# cores (a training job, a test run), so these sleep instead; training processes keep the default policy, which
# trains ~3x faster on 2 threads. The policy is read once, when torch loads, so it is set before any import of it.
WAITING_COMMANDS = ("serve", "worker")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors are user errors too: one line, status 2
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreambooth-lora", description="DreamBooth-LoRA Studio: train, mix and use subject adapters.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--data-root", default=None, help="data folder (default $DBL_HOME, else ./studio_data)")
        p.add_argument("--prior-dir", default=None, help="class-image cache (default $DBL_PRIOR_DIR, else ./prior_data)")
        return p

    t = command("train", "Train a subject adapter from 3-20 photos (foreground; Ctrl-C leaves a resumable checkpoint).")
    t.add_argument("--images", nargs="+", help="image files or folders")
    t.add_argument("--token", help="rare identifier word, e.g. sks")
    t.add_argument("--class-noun", help="what the subject is, e.g. dog")
    t.add_argument("--name")
    t.add_argument("--base-model", default=None, help="builtin:tiny-world, builtin:tiny-random, a hub id, a folder or a .safetensors file")
    t.add_argument("--config", dest="config_dir", default=None, help="component configs for a single-file checkpoint")
    t.add_argument("--steps", type=int)
    t.add_argument("--rank", type=int, default=8)
    t.add_argument("--alpha", type=float)
    t.add_argument("--prior-weight", type=float, default=1.0, help="lambda; 0 disables class priors")
    t.add_argument("--num-class-images", type=int)
    t.add_argument("--lr", type=float, default=None, help="default 1e-4 (real models), 1e-3 (built-ins)")
    t.add_argument("--resolution", type=int)
    t.add_argument("--text-encoder", default="none", help="none, lora or qlora")
    t.add_argument("--loraplus-ratio", type=float)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--batch-size", type=int)
    emb = t.add_mutually_exclusive_group()
    emb.add_argument("--train-token-embedding", dest="train_token_embedding", action="store_true", default=None)
    emb.add_argument("--no-train-token-embedding", dest="train_token_embedding", action="store_false")
    t.add_argument("--checkpoint-every", type=int, default=0)
    t.add_argument("--resume", metavar="JOB", help="continue an interrupted job from its checkpoint")
    t.add_argument("--device", default="auto")
    t.add_argument("--mixed-precision", default="auto")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    speed = t.add_argument_group("speed and memory (README \"Speed\")")
    speed.add_argument("--low-memory", action="store_true",
                       help="gradient checkpointing, 8-bit AdamW on CUDA, text encoder and VAE off the GPU once cached")
    speed.add_argument("--channels-last", action="store_true", help="NHWC memory layout for the UNet")
    speed.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays only on long runs)")
    speed.add_argument("--no-fused-adam", dest="fused_adam", action="store_false", help="plain AdamW on CUDA")
    speed.add_argument("--host-noise", dest="device_noise", action="store_false",
                       help="draw noise on the CPU and copy it each step (the old way)")
    speed.add_argument("--loss-every", type=int, help="read the loss every K steps (default 10 on CUDA, 1 on CPU)")
    speed.add_argument("--class-batch-size", type=int, help="class images per pipeline call (default 8 CPU, 32 CUDA)")
    t.add_argument("--timings", action="store_true", help="add per-phase timings to the JSON result (bench/speed.py)")

    g = command("generate", "Generate images, optionally with library adapters mixed by weight.")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME[=WEIGHT]")
    g.add_argument("--base-model", default=None)
    g.add_argument("--num-images", type=int, default=4)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--guidance", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--size", type=int)
    g.add_argument("--out", default="outputs")

    lib = command("library", "List and manage trained adapters.")
    lsub = lib.add_subparsers(dest="action", required=True, parser_class=_Parser)
    # --data-root is accepted after the action too (`library list --data-root D`)
    root_flags = argparse.ArgumentParser(add_help=False)
    root_flags.add_argument("--data-root", default=argparse.SUPPRESS)
    root_flags.add_argument("--prior-dir", default=argparse.SUPPRESS)
    lsub.add_parser("list", parents=[root_flags]).add_argument("--json", action="store_true")
    lsub.add_parser("show", parents=[root_flags]).add_argument("name")
    rename = lsub.add_parser("rename", parents=[root_flags])
    rename.add_argument("name")
    rename.add_argument("new_name")
    lsub.add_parser("delete", parents=[root_flags]).add_argument("name")
    export = lsub.add_parser("export", parents=[root_flags], help="write the adapter as a diffusers or kohya/A1111/ComfyUI file")
    export.add_argument("name")
    export.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    export.add_argument("--out", default=None, help="output file (default ./<name>.<format>.safetensors)")
    imp = lsub.add_parser("import", parents=[root_flags], help="add a diffusers, kohya or PEFT LoRA .safetensors file to the library")
    imp.add_argument("file")
    imp.add_argument("--name", default=None)
    imp.add_argument("--base-model", default=None, help="the base model it was trained for (default: the default model)")
    imp.add_argument("--token", default="", help="identifier word the adapter responds to")
    imp.add_argument("--class-noun", default="")
    lsub.add_parser("rank", parents=[root_flags], help="singular values and energy kept at each rank, per layer").add_argument("name")
    resize = lsub.add_parser("resize", parents=[root_flags], help="save a lower-rank copy keeping a chosen energy or rank")
    resize.add_argument("name")
    target = resize.add_mutually_exclusive_group(required=True)
    target.add_argument("--energy", type=float)
    target.add_argument("--rank", type=int)
    resize.add_argument("--name", dest="new_name", default=None)

    mix = command("mix", "Save a weighted mix of library adapters as a new adapter.")
    mix.add_argument("--adapter", action="append", required=True, metavar="NAME=WEIGHT")
    mix.add_argument("--name", required=True)
    mix.add_argument("--method", choices=["cat", "linear", "svd"], default="cat", help="cat is exact (rank = sum of ranks)")
    mix.add_argument("--rank", type=int, default=None, help="rank of the result for --method svd")

    serve = command("serve", "Start the web studio (and its background job worker).")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--auth", default=None, metavar="USER:PASSWORD")

    command("worker", "Run queued training jobs one at a time (serve starts one).")

    pr = command("prior", "Generate (or reuse) class-prior images in the cache.")
    pr.add_argument("--class-prompt", required=True)
    pr.add_argument("--num-images", type=int, required=True)
    pr.add_argument("--base-model", default=None)
    pr.add_argument("--resolution", type=int)
    pr.add_argument("--seed", type=int, default=None, help="seed of image 0 (image i uses seed+i)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command in WAITING_COMMANDS:
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before _quiet_libraries imports torch
        _quiet_libraries()
        return HANDLERS[args.command](args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    diffusers_logging.set_verbosity_error()


def _library(args):
    from .library import Library
    from .paths import data_root

    return Library(data_root(args.data_root))


def cmd_train(args) -> int:
    from .config import TrainConfig
    from .models import default_base_model
    from .train import TrainingStopped, create_job, run_training

    library = _library(args)
    if args.resume:
        job_id = args.resume
        library.job(job_id)  # a clear error for an unknown job
        if not (library.job_folder(job_id) / "checkpoint.safetensors").exists():
            raise UserError(f"Job {job_id} has no checkpoint to resume from.")
    else:
        missing = [flag for flag, value in (("--images", args.images), ("--token", args.token), ("--class-noun", args.class_noun)) if not value]
        if missing:
            raise UserError(f"train needs {', '.join(missing)} (or --resume JOB).")
        config = TrainConfig(
            token=args.token, class_noun=args.class_noun, base_model=args.base_model or default_base_model(),
            name=args.name, steps=args.steps, rank=args.rank, alpha=args.alpha, prior_weight=args.prior_weight,
            num_class_images=args.num_class_images, lr=args.lr, resolution=args.resolution,
            text_encoder=args.text_encoder, loraplus_ratio=args.loraplus_ratio, seed=args.seed,
            train_token_embedding=args.train_token_embedding, batch_size=args.batch_size,
            checkpoint_every=args.checkpoint_every, device=args.device, mixed_precision=args.mixed_precision,
            config_dir=args.config_dir, low_memory=args.low_memory, channels_last=args.channels_last,
            compile=args.compile, fused_adam=args.fused_adam, device_noise=args.device_noise,
            loss_every=args.loss_every, class_batch_size=args.class_batch_size,
        )
        job_id = create_job(library, config, args.images)
    print(f"job {job_id}", file=sys.stderr)
    bar = _ProgressBar(enabled=not args.quiet)
    try:
        result = run_training(library, job_id, args.prior_dir, on_progress=bar.update)
    except TrainingStopped as stopped:
        bar.close()
        library.update_job(job_id, status="interrupted", phase="interrupted", step=stopped.step)
        print(str(stopped), file=sys.stderr)
        return 130
    except UserError:
        bar.close()
        library.update_job(job_id, status="failed")
        raise
    bar.close()
    library.update_job(job_id, status="done", phase="done", adapter_id=result.adapter.id, losses=result.losses)
    print(json.dumps({"adapter": result.adapter.name, "id": result.adapter.id, "seconds": round(result.seconds, 1),
                      "final_loss": result.losses[-1] if result.losses else None,
                      **({"timings": result.timings} if args.timings else {})}))
    return 0


class _ProgressBar:
    """A tqdm bar per phase, fed by the trainer's one progress callback."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.phase = enabled, None, None

    def update(self, progress) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if progress.message:
            (self.bar.write if self.bar else lambda m: print(m, file=sys.stderr))(progress.message)
        if progress.phase in ("class_images", "training") and progress.total and progress.phase != self.phase:
            self.close()
            self.phase = progress.phase
            label = {"class_images": "class images", "training": "training"}.get(progress.phase, progress.phase)
            self.bar = tqdm(total=progress.total, desc=label, file=sys.stderr, dynamic_ncols=True)
        if self.bar is not None and progress.phase == self.phase:
            self.bar.n = progress.step
            if progress.loss is not None:
                self.bar.set_postfix(loss=f"{progress.loss:.4f}", refresh=False)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None


def cmd_generate(args) -> int:
    from .generate import GenerateSettings, generate_to_folder, parse_adapter_spec
    from .models import default_base_model

    settings = GenerateSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, num_images=args.num_images, steps=args.steps,
        guidance=args.guidance, seed=args.seed, size=args.size,
        adapters=tuple(parse_adapter_spec(spec) for spec in args.adapter),
    )
    paths = generate_to_folder(_library(args), settings, Path(args.out), args.base_model, default_base_model())
    for path in paths:
        print(path)
    return 0


def cmd_library(args) -> int:
    library = _library(args)
    if args.action == "list":
        entries = library.list()
        if args.json:
            print(json.dumps([e.summary() for e in entries], indent=1))
        else:
            _print_table(entries)
    elif args.action == "show":
        print(json.dumps({**library.get(args.name).summary(), "meta": library.get(args.name).meta}, indent=1))
    elif args.action == "rename":
        print(library.rename(args.name, args.new_name).name)
    elif args.action == "delete":
        library.delete(args.name)
        print(f"deleted {args.name}")
    elif args.action == "export":
        from .formats import export_adapter

        print(export_adapter(library.get(args.name), args.format, args.out))
    elif args.action == "import":
        from .formats import import_adapter
        from .models import default_base_model

        entry = import_adapter(library, Path(args.file), name=args.name, base_model=args.base_model or default_base_model(),
                               token=args.token, class_noun=args.class_noun)
        print(json.dumps(entry.summary()))
    elif args.action == "rank":
        from .resize import format_rank_report, rank_report

        print(format_rank_report(rank_report(library.get(args.name))))
    elif args.action == "resize":
        from .resize import resize_adapter

        entry, report = resize_adapter(library, args.name, energy=args.energy, rank=args.rank, new_name=args.new_name)
        print(json.dumps({"adapter": entry.name, **report}))
    return 0


def cmd_mix(args) -> int:
    from .generate import parse_adapter_spec
    from .mixing import mix_adapters

    specs = [parse_adapter_spec(spec) for spec in args.adapter]
    entry, report = mix_adapters(_library(args), specs, args.name, method=args.method, rank=args.rank)
    print(json.dumps({"adapter": entry.name, **report}))
    return 0


def cmd_serve(args) -> int:
    from app.server import serve

    return serve(host=args.host, port=args.port, auth=args.auth, data_root=args.data_root, prior_dir=args.prior_dir)


def cmd_worker(args) -> int:
    from .worker import run_worker

    return run_worker(_library(args), args.prior_dir)


def _print_table(entries) -> None:
    if not entries:
        print("The library is empty: train an adapter with `dreambooth-lora train`.")
        return
    rows = [("NAME", "TOKEN", "CLASS", "BASE MODEL", "RANK", "STEPS", "CREATED", "SIZE")]
    for e in entries:
        s = e.summary()
        rows.append((e.name, e.token, e.class_noun, e.base_model, str(e.rank), str(e.steps), s["created_iso"], f"{e.size_bytes / 1024:.0f} KB"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def cmd_prior(args) -> int:
    from .models import default_base_model, load_base_model
    from .paths import prior_root
    from .prior import PRIOR_SEED, PriorSettings, ensure_prior_images

    if not 1 <= args.num_images <= 10_000:
        raise UserError(f"--num-images {args.num_images}: must be from 1 to 10000.")
    model = load_base_model(args.base_model or default_base_model())
    settings = PriorSettings(prompt=args.class_prompt, resolution=args.resolution or model.native_resolution,
                             seed_base=PRIOR_SEED if args.seed is None else args.seed)
    paths, generated = ensure_prior_images(model, settings, args.num_images, prior_root(args.prior_dir))
    print(json.dumps({"folder": str(paths[0].parent), "images": len(paths), "generated": generated, "reused": len(paths) - generated}))
    return 0


HANDLERS = {
    "train": cmd_train, "generate": cmd_generate, "library": cmd_library, "prior": cmd_prior,
    "mix": cmd_mix, "serve": cmd_serve, "worker": cmd_worker,
}

if __name__ == "__main__":
    sys.exit(main())
