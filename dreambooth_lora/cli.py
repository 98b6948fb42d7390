"""The `dreambooth-lora` command. User mistakes exit with status 2 and one sentence on stderr."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import UserError
from .quiet import quiet_libraries

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors are user errors too: one line, status 2
    # (choice flags that TrainConfig validates show their choices as a metavar, so its one message applies)
        raise UserError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dreambooth-lora", description="DreamBooth-LoRA Studio: train, mix and use subject adapters.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--data-root", default=None, help="data folder (default $DBL_HOME, else ./studio_data)")
        p.add_argument("--prior-dir", default=None, help="class-image cache (default $DBL_PRIOR_DIR, else ./prior_data)")
        return p

    # --data-root is accepted after a subcommand's action too (`library list --data-root D`)
    root_flags = argparse.ArgumentParser(add_help=False)
    root_flags.add_argument("--data-root", default=argparse.SUPPRESS, help="data folder (default $DBL_HOME, else ./studio_data)")
    root_flags.add_argument("--prior-dir", default=argparse.SUPPRESS, help="class-image cache (default $DBL_PRIOR_DIR, else ./prior_data)")

    t = command("train", "Train a subject adapter from 3-20 photos (foreground; Ctrl-C leaves a resumable checkpoint).")
    t.add_argument("--images", nargs="+", metavar="PATH", help="the subject's photos: image files or folders of them (3-20)")
    t.add_argument("--token", help="the identifier the subject is called by in prompts: one rare word, e.g. sks")
    t.add_argument("--class-noun", help="what the subject is, e.g. dog; class images show 'a photo of a <class>'")
    t.add_argument("--name", help="library name of the adapter (default <token>-<class>-<date>-<time>)")
    t.add_argument("--base-model", default=None, metavar="MODEL",
                   help="builtin:tiny-world (default), builtin:tiny-random, a hub id, a diffusers folder or a .safetensors file")
    t.add_argument("--config", dest="config_dir", default=None, metavar="DIR",
                   help="component configs (a diffusers folder) for a single-file .safetensors checkpoint")
    t.add_argument("--steps", type=int, help="training steps (default: 150 per photo for real models, 400 for built-ins)")
    t.add_argument("--adapter-type", default="lora", metavar="{lora,dora,loha,lokr,qrlora,vera,adalora}",
                   help="the UNet's adapter (default lora; the text encoder's stays LoRA). lora: delta W = (alpha/r) B A. "
                        "dora: LoRA for the direction plus a learned magnitude per output row. loha: (alpha/r) (W1a W1b) * "
                        "(W2a W2b), two rank-r products multiplied elementwise (rank up to r^2). lokr: (alpha/r) kron(W1, W2), "
                        "W2 of rank r when r is below half its size, else both factors full. qrlora: Q_r diag(lambda) R_r of "
                        "a pivoted QR of each frozen weight, only the r values lambda per layer learn. vera: PEFT's VeRA, "
                        "shared frozen random A, B and two learned vectors per layer. adalora: PEFT's AdaLoRA, B (A * E) "
                        "alpha/r whose ranks move between layers during the run. qrlora, vera and adalora are stored "
                        "as exact LoRA factors")
    t.add_argument("--rank", type=int, default=8,
                   help="rank r, 1-256 (default 8): of B A for lora/dora, of each product for loha, of the second "
                        "Kronecker factor for lokr, the QR columns kept for qrlora, of the shared projections for vera, the average final rank for "
                        "adalora (it starts at 1.5 r)")
    t.add_argument("--alpha", type=float,
                   help="alpha; lora/dora/loha/lokr scale their update by alpha/rank (default alpha = rank, scale 1); "
                        "adalora: alpha/r with r its starting rank; not for qrlora/vera, whose learned vectors set the scale")
    t.add_argument("--unet-layers", default=None, metavar="{attention,cross-attention,no-prompt-kv}",
                   help="the UNet's layers that carry the adapter: every attention projection (self- and "
                        "cross-attention; the default for real models), cross-attention's only, where the prompt enters, "
                        "or every one but cross-attention's keys and values, which read the prompt's words, so that a "
                        "class word keeps the base model's meaning (the default for built-ins, README \"Quality\")")
    t.add_argument("--qr-energy", type=float, default=None, metavar="TAU",
                   help="qrlora only: per layer keep the fewest pivoted-QR columns whose |R_ii|^2 hold this share "
                        "of the total, e.g. 0.5 (default: --rank columns)")
    t.add_argument("--prior-weight", type=float, default=1.0, metavar="LAMBDA",
                   help="weight of the class-image (prior-preservation) loss; 0 turns class images off (default 1)")
    t.add_argument("--num-class-images", type=int, metavar="N",
                   help="class-prior images generated by the base model and cached (default 200)")
    t.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4 for real models, 7e-4 for built-ins)")
    t.add_argument("--resolution", type=int, metavar="PX",
                   help="training size in pixels, a multiple of 8 (default: the model's native size, 512 for real models)")
    t.add_argument("--text-encoder", default="none", metavar="{none,lora,qlora}",
                   help="none: frozen (default); lora: LoRA on its attention; qlora: 4-bit NF4 encoder with LoRA")
    t.add_argument("--loraplus-ratio", type=float, metavar="K", help="LoRA+: B learns K times faster than A (paper: 16; default off)")
    t.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation, noise and sampling (default 0)")
    t.add_argument("--batch-size", type=int, help="photos per step, plus as many class images (default 1 real, 3 built-ins)")
    emb = t.add_mutually_exclusive_group()
    emb.add_argument("--train-token-embedding", dest="train_token_embedding", action="store_true", default=None,
                     help="also learn the identifier's input embedding (pivotal tuning; default on for built-ins)")
    emb.add_argument("--no-train-token-embedding", dest="train_token_embedding", action="store_false",
                     help="keep the identifier's embedding frozen (default for real models)")
    t.add_argument("--checkpoint-every", type=int, default=100, metavar="K",
                   help="save a resumable checkpoint every K steps (default 100; 0: by time only)")
    t.add_argument("--checkpoint-seconds", type=float, default=120.0, metavar="S",
                   help="... or every S seconds, whichever comes first (default 120; 0: by steps only)")
    t.add_argument("--sample-every", type=int, metavar="K",
                   help="draw samples every K steps while training into the job's samples/ folder (default none; the "
                        "studio's worker: 4 per run)")
    t.add_argument("--sample-prompt", dest="sample_prompts", action="append", default=[], metavar="PROMPT",
                   help="a prompt for those samples and the adapter's saved samples; repeat for up to 4 (default: the "
                        "instance prompt)")
    t.add_argument("--resume", metavar="JOB",
                   help="continue an interrupted, cancelled or failed job from its checkpoint, in the foreground (other options are the job's)")
    t.add_argument("--submit", action="store_true",
                   help="queue the job for the worker (`serve` or `dreambooth-lora worker`) instead of training here")
    t.add_argument("--device", default="auto", metavar="{auto,cpu,cuda}", help="where to train (default auto: CUDA if present)")
    t.add_argument("--mixed-precision", default="auto", metavar="{auto,no,fp16,bf16}",
                   help="CUDA compute dtype (default auto: bf16 where supported, else fp16; fp32 on CPU)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    speed = t.add_argument_group("speed and memory (README \"Speed\")")
    speed.add_argument("--low-memory", action="store_true",
                       help="gradient checkpointing, 8-bit AdamW on CUDA, text encoder and VAE off the GPU once cached")
    speed.add_argument("--channels-last", action="store_true", help="NHWC memory layout for the UNet")
    speed.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays only on long runs)")
    speed.add_argument("--no-fused-adam", dest="fused_adam", action="store_false", help="plain AdamW (PyTorch's default: per-tensor on CPU)")
    speed.add_argument("--host-noise", dest="device_noise", action="store_false",
                       help="draw noise on the CPU and copy it each step (the old way)")
    speed.add_argument("--loss-every", type=int, help="read the loss every K steps (default 10 on CUDA, 1 on CPU)")
    speed.add_argument("--cpu-threads", type=int, metavar="N",
                       help="CPU threads for the training steps (default: 1 for a small step, e.g. sd15-toy at 64 px, where a "
                            "second thread gains little and stalls whenever another process wants a core; else torch's)")
    speed.add_argument("--class-batch-size", type=int, help="class images per pipeline call (default 8 CPU, 32 CUDA)")
    speed.add_argument("--no-samples", dest="samples", action="store_false",
                       help="draw no sample images after the adapter is saved (they cost a run about 2 s on CPU)")
    t.add_argument("--timings", action="store_true", help="add per-phase timings to the JSON result (bench/speed.py)")
    quality = t.add_argument_group("objective and meter (README \"Quality\")")
    quality.add_argument("--prior-batch-size", type=int, metavar="N",
                         help="class images per step with priors (default: as many as --batch-size); each part of the "
                              "loss is a mean of its own, so more class images sample the class better at the same weight")
    quality.add_argument("--prior-target", default=None, metavar="{noise,frozen}",
                         help="what the class images' predictions are trained towards: the drawn noise (DreamBooth's, "
                              "the default for real models) or the frozen base model's prediction on the same noisy "
                              "image (the same pull without the noise's variance; one more forward pass of the class "
                              "rows a step; the default for built-ins)")
    quality.add_argument("--contrast-rows", type=int, default=None, metavar="N",
                         help="with --prior-target frozen: N rows a step of your photos under the class prompt, trained "
                              "towards the frozen model's prediction, so that the class word without the identifier "
                              "does not draw your subject (default 2 on built-ins with the frozen target, else 0)")
    quality.add_argument("--caption-dropout", type=float, default=None, metavar="P",
                         help="train each photo's row under the empty prompt with probability P instead of the "
                              "instance prompt; guidance then takes what the empty prompt learned of the subject out of "
                              "prompts without the identifier (less of the subject in plain class images, at some cost "
                              "in likeness; default 0.05 on built-ins, else 0)")
    quality.add_argument("--snr-gamma", type=float, default=0.0, metavar="GAMMA",
                         help="min-SNR-γ loss weighting, weight min(SNR, γ)/SNR (Hang et al. 2023; 5 is usual; default 0: off)")
    quality.add_argument("--noise-offset", type=float, default=0.0, metavar="X",
                         help="add X·N(0,1) per image and channel to the noise (0.05-0.1 usual; default 0: off)")
    quality.add_argument("--lr-schedule", default="constant", metavar="{constant,cosine}",
                         help="constant (default) or cosine: the learning rate falls from its value to 0 at the last step")
    quality.add_argument("--ema-decay", type=float, default=None, metavar="D",
                         help="save an exponential moving average of the trained weights with decay D instead of the "
                              "last step's (bias-corrected; 0: off; default: the base model's, README \"Quality\")")
    quality.add_argument("--meter-every", type=int, default=0, metavar="K",
                         help="every K steps (and at the last) measure the photos' denoising loss and the prior drift on "
                              "fixed probes, keeping the adapter at each point (default 0: off)")
    quality.add_argument("--keep", default="final", metavar="{final,best,both}",
                         help="what goes to the library: the final weights (default), the meter's chosen point, or both "
                              "(the chosen one as <name>-step<N>); best and both need --meter-every")

    g = command("generate", "Generate images, optionally with library adapters mixed by weight.")
    g.add_argument("--prompt", required=True, help="what to draw; use an adapter's token, e.g. 'a photo of sks dog'")
    g.add_argument("--negative-prompt", default="", help="what to steer away from (default none)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME[=UNET[:TEXT]]",
                   help="a library adapter and its strength (default 1; negative subtracts); UNET:TEXT sets the UNet and "
                        "text-encoder strengths apart (the text one also scales the identifier embedding; omitted, it "
                        "equals the UNet one); a component at 0 is not applied at all; repeat to mix")
    g.add_argument("--base-model", default=None, metavar="MODEL", help="default: the adapters' base model, else the default model")
    g.add_argument("--num-images", type=int, default=4, help="images to generate (default 4)")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    g.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed+i (default 0)")
    g.add_argument("--size", type=int, metavar="PX", help="image size in pixels (default: the model's native size)")
    g.add_argument("--out", default="outputs", metavar="DIR", help="folder for the PNGs (default ./outputs)")

    lib = command("library", "List and manage trained adapters.")
    lsub = lib.add_subparsers(dest="action", required=True, parser_class=_Parser)
    name_help = "the adapter's library name"
    lsub.add_parser("list", parents=[root_flags], help="a table of the adapters").add_argument(
        "--json", action="store_true", help="print JSON instead of a table")
    lsub.add_parser("show", parents=[root_flags], help="one adapter's details as JSON").add_argument("name", help=name_help)
    rename = lsub.add_parser("rename", parents=[root_flags], help="give an adapter a new name (its id stays)")
    rename.add_argument("name", help=name_help)
    rename.add_argument("new_name", help="the new name")
    lsub.add_parser("delete", parents=[root_flags], help="remove an adapter and its files").add_argument("name", help=name_help)
    export = lsub.add_parser("export", parents=[root_flags], help="write the adapter as a diffusers or kohya/A1111/ComfyUI file")
    export.add_argument("name", help=name_help)
    export.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers",
                        help="diffusers (load_lora_weights) or kohya (A1111, ComfyUI); default diffusers")
    export.add_argument("--out", default=None, metavar="FILE", help="output file (default ./<name>.<format>.safetensors)")
    imp = lsub.add_parser("import", parents=[root_flags], help="add a diffusers, kohya or PEFT LoRA .safetensors file to the library")
    imp.add_argument("file", help="a .safetensors LoRA file (pickle files are refused)")
    imp.add_argument("--name", default=None, help="library name (default: from the file name)")
    imp.add_argument("--base-model", default=None, metavar="MODEL",
                     help="the base model it was trained for (default: the one the file's metadata names, else the default model)")
    imp.add_argument("--embedding", default=None, metavar="FILE",
                     help="the identifier-embedding sidecar of a kohya file (default: <file stem>.embedding.safetensors beside it)")
    imp.add_argument("--token", default="", help="identifier word the adapter responds to")
    imp.add_argument("--class-noun", default="", help="what the subject is, e.g. dog")
    lsub.add_parser("rank", parents=[root_flags], help="singular values and energy kept at each rank, per layer").add_argument("name", help=name_help)
    resize = lsub.add_parser("resize", parents=[root_flags], help="save a lower-rank copy keeping a chosen energy or rank")
    resize.add_argument("name", help=name_help)
    target = resize.add_mutually_exclusive_group(required=True)
    target.add_argument("--energy", type=float, help="keep the smallest rank per layer that holds this share of energy, e.g. 0.95")
    target.add_argument("--rank", type=int, help="one rank for every layer")
    resize.add_argument("--name", dest="new_name", default=None, help="name of the copy (default <name>-r<rank> or -e<energy>)")

    mix = command("mix", "Save a weighted mix of library adapters as a new adapter.")
    mix.add_argument("--adapter", action="append", required=True, metavar="NAME=UNET[:TEXT]",
                     help="an adapter and its weight (negative subtracts), or UNet and text-encoder weights apart; "
                          "repeat for each part")
    mix.add_argument("--name", required=True, help="library name of the mix")
    mix.add_argument("--method", default="cat", metavar="METHOD",
                     help="cat: exact (rank = sum of ranks, default); linear: same ranks, approximate; svd: re-factorised to "
                          "--rank; PEFT's merges ties, dare_linear, dare_ties, magnitude_prune (same ranks; on A and B) and "
                          "their *_svd variants (on each delta W, then re-factorised to --rank)")
    mix.add_argument("--rank", type=int, default=None,
                     help="rank of the result for --method svd and the *_svd merges (default: the largest part rank)")
    mix.add_argument("--density", type=float, default=None,
                     help="ties/dare/magnitude_prune merges: the share of values kept, in (0, 1] (required for them)")
    mix.add_argument("--majority-sign", choices=["total", "frequency"], default=None,
                     help="ties and dare_ties merges: elect each value's sign by total magnitude (default) or by count")
    mix.add_argument("--seed", type=int, default=None, help="dare merges: seed of the random mask (default 0)")

    serve = command("serve", "Start the web studio (and its background job worker).")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    logins = serve.add_mutually_exclusive_group()
    logins.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this login (default: none)")
    logins.add_argument("--users", default=None, metavar="FILE",
                        help="a login per person from this users file (`users add`); each sees only their own adapters, "
                             "jobs and generations, an admin everyone's")
    engine_flags(serve)

    users = sub.add_parser("users", help="Manage the users file of `serve --users`.",
                           description="Manage the users file of `serve --users`.")
    usub = users.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add_user = usub.add_parser("add", help="add a user; the password is read from stdin (one line)")
    add_user.add_argument("name", help="the login name (letters, digits, '_', '.', '-')")
    add_user.add_argument("--users", required=True, metavar="FILE", help="the users file (created if missing)")
    add_user.add_argument("--admin", action="store_true", help="this user sees, and may change, every user's work")

    w = command("worker", "Run queued training jobs one at a time (serve starts one).")
    w.add_argument("--until-idle", action="store_true", help="stop when the queue is empty instead of waiting for more")
    w.add_argument("--job", metavar="JOB", help="(used by the worker itself) train the job this process's parent worker claimed")
    engine_flags(w)

    jobs = command("jobs", "List and manage training jobs (queued, running and finished).")
    jsub = jobs.add_subparsers(dest="action", required=True, parser_class=_Parser)
    job_id_help = "the job's id (printed by train; see `jobs list`)"
    jsub.add_parser("list", parents=[root_flags], help="a table of the jobs, newest first").add_argument(
        "--json", action="store_true", help="print JSON instead of a table")
    show = jsub.add_parser("show", parents=[root_flags], help="one job: status, phase, step, losses, error, adapter, runner")
    show.add_argument("job", help=job_id_help)
    show.add_argument("--json", action="store_true", help="print JSON (all fields) instead of a summary")
    jsub.add_parser("cancel", parents=[root_flags], help="cancel a queued job, or stop a running one at its next step "
                    "(its checkpoint is kept)").add_argument("job", help=job_id_help)
    jsub.add_parser("resume", parents=[root_flags], help="queue an interrupted, cancelled or failed job again for the worker; "
                    "it continues from its last checkpoint").add_argument("job", help=job_id_help)
    jsub.add_parser("delete", parents=[root_flags], help="remove a finished job, its photos and its checkpoint "
                    "(its adapter stays in the library)").add_argument("job", help=job_id_help)

    pr = command("prior", "Generate (or reuse) class-prior images in the cache.")
    pr.add_argument("--class-prompt", required=True, help="e.g. 'a photo of a dog'")
    pr.add_argument("--num-images", type=int, required=True, help="how many images the cache should hold (1-10000)")
    pr.add_argument("--base-model", default=None, metavar="MODEL", help="default: the default model")
    pr.add_argument("--resolution", type=int, metavar="PX", help="default: the model's native size")
    pr.add_argument("--seed", type=int, default=None, help="seed of image 0 (image i uses seed+i)")
    return parser


def engine_flags(parser) -> None:
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="who trains queued jobs: local (one job at a time on this machine; default) or ray (each job "
                        "a Ray task needing one GPU, on any machine of the Ray cluster; needs the cluster extra)")
    parser.add_argument("--ray-address", default=None, metavar="ADDRESS",
                        help="with --engine ray: the cluster to join (default $RAY_ADDRESS, else a `ray start` instance "
                        "on this machine, else a private local one; 'local' forces the latter)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve" or args.command == "worker" and not args.job and args.engine == "local":
            wait_passively()  # before quiet_libraries imports torch
        quiet_libraries()
        return HANDLERS[args.command](args) or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # `dreambooth-lora jobs list | head`: the reader has gone, which is no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second complaint when Python flushes
        return 0


def _library(args):
    from .library import Library
    from .paths import data_root

    return Library(data_root(args.data_root))


def cmd_train(args) -> int:
    from .config import TrainConfig
    from .jobs import Jobs, JobStatus, Runner, run_job
    from .models import default_base_model

    jobs = Jobs(_library(args))
    if args.resume:
        if args.submit:
            raise UserError("train --resume JOB runs in the foreground; to queue it for the worker use `jobs resume JOB`.")
        job_id = jobs.claim(args.resume, Runner.this_process()).id
    else:
        missing = [flag for flag, value in (("--images", args.images), ("--token", args.token), ("--class-noun", args.class_noun)) if not value]
        if missing:
            raise UserError(f"train needs {', '.join(missing)} (or --resume JOB).")
        config = TrainConfig(
            token=args.token, class_noun=args.class_noun, base_model=args.base_model or default_base_model(),
            name=args.name, steps=args.steps, rank=args.rank, alpha=args.alpha, prior_weight=args.prior_weight,
            num_class_images=args.num_class_images, lr=args.lr, resolution=args.resolution,
            text_encoder=args.text_encoder, unet_layers=args.unet_layers, adapter_type=args.adapter_type, qr_energy=args.qr_energy, loraplus_ratio=args.loraplus_ratio, seed=args.seed,
            train_token_embedding=args.train_token_embedding, batch_size=args.batch_size, prior_batch_size=args.prior_batch_size,
            prior_target=args.prior_target, contrast_rows=args.contrast_rows, caption_dropout=args.caption_dropout,
            checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds, device=args.device,
            mixed_precision=args.mixed_precision, config_dir=args.config_dir, low_memory=args.low_memory,
            channels_last=args.channels_last, compile=args.compile, fused_adam=args.fused_adam,
            device_noise=args.device_noise, loss_every=args.loss_every, class_batch_size=args.class_batch_size, cpu_threads=args.cpu_threads, samples=args.samples,
            snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, meter_every=args.meter_every, keep=args.keep,
            lr_schedule=args.lr_schedule, ema_decay=args.ema_decay,
            sample_every=args.sample_every, sample_prompts=tuple(args.sample_prompts),
        )
        job_id = jobs.create(config, args.images, status=JobStatus.QUEUED if args.submit else JobStatus.RUNNING)
    print(f"job {job_id}", file=sys.stderr)
    token = jobs.get(job_id).config["token"]
    if not args.resume and token != args.token:
        print(f"note: the identifier {args.token!r} is already in use on this base model, so this subject is called "
              f"{token!r}: use it in prompts, e.g. 'a photo of {token} {args.class_noun}'.", file=sys.stderr)
    if args.submit:
        print(json.dumps({"job": job_id, "status": "queued", "token": token}))
        return 0
    bar = _ProgressBar(enabled=not args.quiet)
    started = time.time()
    try:
        job = run_job(jobs, job_id, args.prior_dir, observer=lambda _, progress: bar.update(progress), raise_user_errors=True)
    finally:
        bar.close()
    if job.status in (JobStatus.INTERRUPTED, JobStatus.CANCELLED):
        print(f"{job.message}; resume with: dreambooth-lora train --resume {job_id}", file=sys.stderr)
        return 130
    if job.status == JobStatus.FAILED:
        print(f"error: training failed: {job.error} (the traceback is in {job.folder / 'log.txt'})", file=sys.stderr)
        return 1
    if job.status != JobStatus.DONE:  # given up on while it ran: queued or running under another runner now
        return 1
    timings, meter = job.folder / "timings.json", job.meter_record
    chosen_adapter = None
    if meter.get("chosen_adapter_id"):
        chosen_adapter = jobs.library.get(meter["chosen_adapter_id"]).name
    print(json.dumps({"job": job_id, "adapter": jobs.adapter_name(job), "id": job.adapter_id, "token": token, "steps": job.step,
                      "seconds": round(time.time() - started, 1), "final_loss": job.losses[-1] if job.losses else None,
                      "meter": meter.get("meter", []), "chosen_step": meter.get("chosen_step"),
                      **({"chosen_adapter": chosen_adapter} if chosen_adapter else {}),
                      **({"timings": json.loads(timings.read_text())} if args.timings and timings.exists() else {})}))
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
        entry = library.get(args.name)
        print(json.dumps({**entry.summary(), "adapter_type": entry.adapter_type, "trainable_params": entry.trainable_params,
                          "meta": entry.meta}, indent=1))
    elif args.action == "rename":
        print(library.rename(args.name, args.new_name).name)
    elif args.action == "delete":
        library.delete(args.name)
        print(f"deleted {args.name}")
    elif args.action == "export":
        from .formats import export_adapter

        path, notes = export_adapter(library.get(args.name), args.format, args.out)
        print(path)
        _print_notes(notes)
    elif args.action == "import":
        from .formats import import_adapter

        entry, notes = import_adapter(library, Path(args.file), name=args.name, base_model=args.base_model,
                                      token=args.token, class_noun=args.class_noun,
                                      sidecar=Path(args.embedding) if args.embedding else None)
        print(json.dumps({**entry.summary(), "notes": notes}))
        _print_notes(notes)
    elif args.action == "rank":
        from .resize import format_rank_report, rank_report

        print(format_rank_report(rank_report(library.get(args.name))))
    elif args.action == "resize":
        from .resize import resize_adapter

        entry, report = resize_adapter(library, args.name, energy=args.energy, rank=args.rank, new_name=args.new_name)
        print(json.dumps({"adapter": entry.name, **report}))
    return 0


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


def cmd_mix(args) -> int:
    from .generate import parse_adapter_spec
    from .mixing import mix_adapters

    specs = [parse_adapter_spec(spec) for spec in args.adapter]
    entry, report = mix_adapters(_library(args), specs, args.name, method=args.method, rank=args.rank,
                                 density=args.density, majority_sign=args.majority_sign, seed=args.seed)
    print(json.dumps({"adapter": entry.name, **report}))
    return 0


def cmd_serve(args) -> int:
    from app.server import serve

    return serve(host=args.host, port=args.port, auth=args.auth, data_root=args.data_root, prior_dir=args.prior_dir,
                 engine=args.engine, ray_address=args.ray_address, users=args.users)


def cmd_users(args) -> int:
    """`users add NAME --users FILE [--admin]`: the password is one line on stdin (asked for on a terminal)."""
    from .users import add_user, validate_user_name

    validate_user_name(args.name)
    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"Password for {args.name}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    user = add_user(Path(args.users), args.name, password, admin=args.admin)
    print(f"added {'admin ' if user.admin else ''}user {user.name} to {args.users}")
    return 0


def cmd_worker(args) -> int:
    if args.job:  # a training child: the default OpenMP policy (run_in_child dropped the idle one)
        from .worker import run_claimed_job

        return run_claimed_job(_library(args), args.job, args.prior_dir)
    if args.engine == "ray":
        from .ray_dispatch import run_dispatcher

        return run_dispatcher(_library(args), args.prior_dir and Path(args.prior_dir).resolve(), args.ray_address,
                              until_idle=args.until_idle)
    from .worker import run_worker

    return run_worker(_library(args), args.prior_dir, until_idle=args.until_idle, isolate=True)


def wait_passively() -> None:
    """For processes that mostly wait (serve, the idle worker): OpenMP threads sleep instead of spinning.

    Spinning threads slow every other process on the cores (a training job, a test run); training processes
    keep the default policy, which trains ~3x faster on 2 threads. The policy is read once, when torch loads
    its OpenMP runtime, so main() calls this before anything imports torch. A policy the person set is kept;
    one set here is dropped again for the worker's training children (worker.run_in_child).
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["DBL_PASSIVE_WAIT"] = "1"


def cmd_jobs(args) -> int:
    from .jobs import Jobs, JobStatus

    jobs = Jobs(_library(args))
    if args.action == "list":
        listed = jobs.list()
        if args.json:
            print(json.dumps([job.to_dict(jobs.adapter_name(job)) for job in listed], indent=1))
        elif not listed:
            print("No jobs yet: start one with `dreambooth-lora train` (or --submit to queue it).")
        else:
            rows = [("JOB", "STATUS", "PHASE", "STEP", "NAME", "UPDATED")]
            rows += [(j.id, str(j.status), j.phase, f"{j.step}/{j.total}" if j.total else str(j.step), j.name,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.updated))) for j in listed]
            _print_rows(_with_users(rows, [j.owner for j in listed]))
    elif args.action == "show":
        job = jobs.get(args.job)
        record = job.to_dict(jobs.adapter_name(job))
        if args.json:
            print(json.dumps(record, indent=1))
        else:
            for key in ("id", "status", "phase", "step", "total", "message", "error", "adapter", "runner"):
                if record[key] not in (None, ""):
                    print(f"{key}: {record[key]}")
            if job.losses:
                print(f"losses: {len(job.losses)} (last {job.losses[-1]:.4f})")
            if record["meter"]:
                print(f"meter: {len(record['meter'])} points, chosen step {record['chosen_step']}")
            print(f"log: {job.folder / 'log.txt'}")
    elif args.action == "cancel":
        status = jobs.cancel(args.job)
        print(f"job {args.job}: {status}" + (" (it stops at its next step)" if status == JobStatus.CANCELLING else ""))
    elif args.action == "resume":
        print(f"job {args.job}: queued for the worker; it {jobs.resume(args.job)}")
    elif args.action == "delete":
        jobs.delete(args.job)
        print(f"deleted job {args.job}")
    return 0


def _print_table(entries) -> None:
    if not entries:
        print("The library is empty: train an adapter with `dreambooth-lora train`.")
        return
    rows = [("NAME", "TOKEN", "CLASS", "BASE MODEL", "RANK", "STEPS", "CREATED", "SIZE")]
    for e in entries:
        s = e.summary()
        rows.append((e.name, e.token, e.class_noun, e.base_model, str(e.rank), str(e.steps), s["created_iso"], f"{e.size_bytes / 1024:.0f} KB"))
    _print_rows(_with_users(rows, [e.owner for e in entries]))


def _with_users(rows: list[tuple[str, ...]], owners: list) -> list[tuple[str, ...]]:
    """A USER column (`serve --users`; "-": no user) once any row has one: the CLI sees every user's."""
    if not any(owners):
        return rows
    return [(*rows[0], "USER"), *[(*row, owner or "-") for row, owner in zip(rows[1:], owners)]]


def _print_rows(rows: list[tuple[str, ...]]) -> None:
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
    "mix": cmd_mix, "serve": cmd_serve, "users": cmd_users, "worker": cmd_worker, "jobs": cmd_jobs,
}

if __name__ == "__main__":
    sys.exit(main())
