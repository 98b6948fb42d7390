"""Personalisation quality on builtin:tiny-world, judged by the world's analyser (the engine of bench/quality.py).

For each shipped subject: train with the product's defaults at lambda = 1 and lambda = 0 and measure
subject_fidelity ("a photo of sks <class>" images judged to be the subject), prior_leak (plain
"a photo of a <class>" images judged to be the subject), class_diversity (total-variation distance
between the attributes of plain class images and the base model's), recontext (asked background
obeyed in "a photo of sks <class> on a green background", and how many of those are the subject),
plus text encoder none/lora/qlora for one subject.

The work is a list of independent tasks (class images, base-model baselines, one training + evaluation
per run) spread over worker processes of one thread each: a training step of this small model gains
little from a second thread, so two single-threaded workers nearly double throughput on 2 cores.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

MODEL = "builtin:tiny-world"
TOKEN = "sks"
RECONTEXT_BACKGROUND = "green"  # never behind a shipped instance image
ATTRIBUTES = ("colours", "pattern", "background")
EVAL_SEED = 10_000
FLOOR_SEED = 110_000  # a second, disjoint set of seeds (image i has seed + i) for the diversity distance's floor
# The class prompt gets this many times `samples` images: its readings feed the diversity distance, a total
# variation over samples, whose floor (the base model against itself at other seeds) is about 0.20 at 32 images
# against 32 (README "Quality", "The diversity distance's floor"), as large as the half-of-lambda-0 bar it is
# judged by. Four times as many images bring the floor down by about half (1/sqrt(4)).
CLASS_SAMPLES_FACTOR = 4


@dataclass(frozen=True)
class Run:
    subject: str
    prior_weight: float
    seed: int
    text_encoder: str
    variant: str = ""  # bench/options.py: which option row the run belongs to

    @property
    def name(self) -> str:
        return f"{self.subject}-l{self.prior_weight:g}-s{self.seed}-{self.text_encoder}" + (f"-{self.variant}" if self.variant else "")


@dataclass(frozen=True)
class Settings:
    """What the bench varies; None keeps the product's default for the built-in model."""

    samples: int = 32
    steps: int | None = None
    lr: float | None = None
    token_lr: float | None = None
    batch_size: int | None = None
    prior_batch_size: int | None = None  # None: as many class images per step as instance images
    prior_target: str | None = None  # None: the product's default (noise)
    contrast_rows: int | None = None  # None: the product's default
    caption_dropout: float | None = None  # None: the product's default
    unet_layers: str | None = None  # None: the product's default
    text_encoder: str = "none"
    adapter_type: str = "lora"  # the UNet's adapter type (bench/methods.py compares them)
    snr_gamma: float = 0.0
    noise_offset: float = 0.0
    meter_every: int = 0  # on: keep both, and the row also scores the meter's chosen point ("chosen")
    lr_schedule: str = "constant"
    ema_decay: float | None = None  # None: the product's default
    rank: int | None = None  # None: TrainConfig's rank
    num_class_images: int | None = None  # None: the product's default for the built-ins


def prompts(cls: str) -> dict[str, str]:
    return {
        "instance": f"a photo of {TOKEN} {cls}",
        "class": f"a photo of a {cls}",
        "recontext": f"a photo of {TOKEN} {cls} on a {RECONTEXT_BACKGROUND} background",
    }


def plan(quick: bool, text_encoder: str = "none", seeds=None) -> list[Run]:
    """Quick: one subject, one seed, lambda {1, 0}. Full: every subject x lambda x 2 seeds + the other TE modes.
    `seeds` (not quick): every subject x lambda x these seeds, without the TE modes (fresh seeds for a check)."""
    from ..tinyworld import world

    subjects = list(world.SUBJECTS)[: 1 if quick else None]
    chosen = [0] if quick else list(seeds or [0, 1])
    runs = [Run(s, lam, seed, text_encoder) for s in subjects for lam in (1.0, 0.0) for seed in chosen]
    if not quick and not seeds:
        runs += [Run(subjects[0], 1.0, 0, mode) for mode in ("none", "lora", "qlora") if mode != text_encoder]
    return runs


# ---------------------------------------------------------------- the maths (pure)


def total_variation(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()) or 1, sum(b.values()) or 1
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def diversity_distance(readings: list, base_readings: list) -> float:
    """Mean total-variation distance of each attribute's distribution (colour set, pattern, background).

    Per-attribute marginals rather than the joint: with tens of samples a joint over ~100 combinations
    is mostly sampling noise.
    """
    def counts(rows, name):
        return Counter(tuple(sorted(getattr(r, name))) if name == "colours" else getattr(r, name) for r in rows)

    return sum(total_variation(counts(readings, n), counts(base_readings, n)) for n in ATTRIBUTES) / len(ATTRIBUTES)


def summarise(results: list[dict]) -> dict:
    def mean(rows, key):
        rows = [r for r in rows if "error" not in r]  # a failed run has no figures; it shows in its own row
        return round(sum(r[key] for r in rows) / len(rows), 3) if rows else None

    main_mode = results[0]["text_encoder"]
    summary = {}
    for lam in (1.0, 0.0):
        rows = [r for r in results if r["prior_weight"] == lam and r["text_encoder"] == main_mode]
        summary[f"lambda={lam:g}"] = {k: mean(rows, k) for k in ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext", "recontext_subject", "train_seconds")}
    for mode in ("none", "lora", "qlora"):
        rows = [r for r in results if r["prior_weight"] == 1.0 and r["text_encoder"] == mode and r["subject"] == results[0]["subject"] and r["seed"] == 0]
        if rows:
            summary[f"text_encoder={mode}"] = {k: mean(rows, k) for k in ("subject_fidelity", "prior_leak", "class_diversity_tv", "recontext", "recontext_subject", "train_seconds")}
    return summary


# ---------------------------------------------------------------- tasks (each runs in a worker)


def generate_many(session, prompt: str, count: int, seed: int, **scale) -> list:
    """`count` images of `prompt`, image i from seed + i as in one call, in calls of at most the product's 64."""
    from ..generate import MAX_IMAGES, GenerateSettings

    return [image for start in range(0, count, MAX_IMAGES)
            for image in session.generate(GenerateSettings(prompt=prompt, num_images=min(MAX_IMAGES, count - start),
                                                           seed=seed + start, **scale))]


def evaluate(session, subject: str, cls: str, samples: int, guidance: float | None = None) -> dict:
    """Generate each prompt `samples` times (the class prompt CLASS_SAMPLES_FACTOR times as often) with fixed seeds
    (at the product's guidance unless given) and read the images back: per prompt, the share that is the subject,
    the share on the recontext background, and per image its reading and whether it is the subject."""
    from ..tinyworld import analyser

    scale = {} if guidance is None else {"guidance": guidance}
    out = {}
    for role, prompt in prompts(cls).items():
        count = samples * CLASS_SAMPLES_FACTOR if role == "class" else samples
        images = generate_many(session, prompt, count, EVAL_SEED, **scale)
        readings = [analyser.analyse(image) for image in images]
        hits = [analyser.is_subject(image, subject) for image in images]
        out[role] = {
            "subject": sum(hits) / count,
            "background": sum(r.background == RECONTEXT_BACKGROUND for r in readings) / count,
            "readings": readings,
            "hits": hits,
        }
    return out


def vae_ceiling(model, subject: str) -> float:
    """Share of the subject's instance images the VAE can reconstruct as the subject: fidelity's ceiling."""
    import torch
    from PIL import Image

    from ..train import image_to_tensor
    from ..tinyworld import analyser, world

    paths = world.subject_image_paths(subject)
    pixels = torch.stack([image_to_tensor(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        recon = model.vae.decode(model.vae.encode(pixels).latent_dist.mean).sample
    arrays = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return sum(analyser.is_subject(a, subject) for a in arrays) / len(arrays)


def baseline_task(subject: str, samples: int) -> tuple[str, dict, float]:
    """The base model on the subject's prompts (scores["class_floor"]: the diversity distance between its class
    images and as many more at other seeds), and the VAE ceiling for the subject."""
    from ..generate import AdapterSession
    from ..models import load_base_model
    from ..tinyworld import analyser, world

    base = load_base_model(MODEL)
    session = AdapterSession(base)
    cls = world.SUBJECTS[subject].cls
    scores = evaluate(session, subject, cls, samples)
    others = generate_many(session, prompts(cls)["class"], samples * CLASS_SAMPLES_FACTOR, FLOOR_SEED)
    scores["class_floor"] = diversity_distance([analyser.analyse(image) for image in others], scores["class"]["readings"])
    return subject, scores, vae_ceiling(base, subject)


def class_images_task(cls: str, work: Path, count: int | None = None) -> str:
    """Generate the class's prior images into the shared cache, as a training run of this class would (`count`
    of them; None: the product's default). Image i has its own seed, so a larger set extends a smaller one."""
    import torch

    from ..config import TrainConfig
    from ..models import load_base_model
    from ..train import ensure_class_images

    base = load_base_model(MODEL)
    config = TrainConfig(token=TOKEN, class_noun=cls, base_model=MODEL, num_class_images=count).resolved(4, True, base.native_resolution)
    ensure_class_images(base, config, torch.device("cpu"), work / "prior")
    return cls


def run_library(work: Path, run: Run) -> Path:
    """The folder of a run's own library: one per run, so workers never share a database (and a run's adapter name
    is taken there once it has trained)."""
    return Path(work) / f"data-{run.name}"


def train_run(run: Run, settings: Settings, work: Path, photos: list[Path] | None = None):
    """Train one adapter with the product's defaults (bar the settings' overrides); (TrainResult, seconds).
    `photos`: the subject's shipped photos unless given (bench/misses.py leaves one out)."""
    from ..config import TrainConfig
    from ..jobs import create_job
    from ..library import Library
    from ..train import run_training
    from ..tinyworld import world

    subject = world.SUBJECTS[run.subject]
    overrides = {k: v for k, v in dict(steps=settings.steps, lr=settings.lr, token_lr=settings.token_lr,
                                        batch_size=settings.batch_size, prior_batch_size=settings.prior_batch_size,
                                        prior_target=settings.prior_target, contrast_rows=settings.contrast_rows,
                                        caption_dropout=settings.caption_dropout,
                                        unet_layers=settings.unet_layers,
                                        ema_decay=settings.ema_decay,
                                        rank=settings.rank, num_class_images=settings.num_class_images).items()
                 if v is not None}
    config = TrainConfig(token=TOKEN, class_noun=subject.cls, base_model=MODEL, name=run.name,
                         prior_weight=run.prior_weight, seed=run.seed, text_encoder=run.text_encoder,
                         snr_gamma=settings.snr_gamma, noise_offset=settings.noise_offset, adapter_type=settings.adapter_type,
                         lr_schedule=settings.lr_schedule,
                         meter_every=settings.meter_every, keep="both" if settings.meter_every else "final", **overrides)
    library = Library(run_library(work, run))
    job = create_job(library, config, photos or world.subject_image_paths(run.subject))
    started = time.time()
    result = run_training(library, job, prior_dir=work / "prior")
    return result, time.time() - started


def train_and_evaluate(run: Run, settings: Settings, work: Path) -> dict:
    """Train one adapter with the product's defaults (bar the settings' overrides) and score it."""
    from ..tinyworld import world

    subject = world.SUBJECTS[run.subject]
    result, seconds = train_run(run, settings, work)
    row = {**asdict(run), "steps": result.adapter.steps, "train_seconds": round(seconds, 1),
           "adapter_type": result.adapter.adapter_type, "trainable_params": result.adapter.trainable_params,
           "file_bytes": result.adapter.size_bytes,
           **adapter_scores(result.adapter, run.subject, subject.cls, settings.samples), "final_loss": result.losses[-1]}
    if settings.meter_every:
        row["meter"], row["chosen_step"] = result.meter, result.chosen_step
        chosen = result.chosen_adapter  # None when the meter chose the final step: the same weights, the same figures
        scores = adapter_scores(chosen, run.subject, subject.cls, settings.samples) if chosen else row
        row["chosen"] = {key: scores[key] for key in (*SCORES, "class_readings")}
    return row


SCORES = ("subject_fidelity", "prior_leak", "recontext", "recontext_subject")


def adapter_scores(adapter, subject: str, cls: str, samples: int) -> dict:
    """An adapter's figures on the world's prompts (class_readings: the class images' attributes, for diversity)."""
    from ..generate import AdapterSession
    from ..models import load_base_model

    session = AdapterSession(load_base_model(MODEL))
    session.apply([(adapter, 1.0)], fuse=True)
    scores = evaluate(session, subject, cls, samples)
    return {"subject_fidelity": scores["instance"]["subject"], "prior_leak": scores["class"]["subject"],
            "recontext": scores["recontext"]["background"], "recontext_subject": scores["recontext"]["subject"],
            "class_readings": scores["class"]["readings"]}


def start_worker() -> None:
    import torch

    from ..quiet import quiet_libraries

    torch.set_num_threads(1)
    quiet_libraries()


# ---------------------------------------------------------------- the whole bench


def start_class_images(pool, tasks: list[tuple[Run, Settings]], work: Path) -> list:
    """Start drawing each class's images for the runs with priors: the largest set any run asks for (None: the
    built-ins' default), once per class, so that no two workers top up one cache. Returns the pending results."""
    from ..config import defaults_for
    from ..tinyworld import world

    classes = sorted({world.SUBJECTS[run.subject].cls for run, _ in tasks if run.prior_weight > 0})
    count = max(settings.num_class_images or defaults_for(True, 4, 0)["num_class_images"] for _, settings in tasks)
    return [pool.apply_async(class_images_task, (cls, work, count)) for cls in classes]


def _run_tasks(pool, tasks: list[tuple[Run, Settings]], work: Path, on_row) -> tuple[dict, list[dict]]:
    runs = [run for run, _ in tasks]
    samples = tasks[0][1].samples
    subjects = list(dict.fromkeys(r.subject for r in runs))
    # Class images first (lambda > 0 runs need them), then work that needs nothing; the longer
    # lambda = 1 runs go in as soon as the class images exist.
    prior_jobs = start_class_images(pool, tasks, work)
    baseline_jobs = [pool.apply_async(baseline_task, (s, samples)) for s in subjects]
    run_jobs = [(r, pool.apply_async(train_and_evaluate, (r, s, work))) for r, s in tasks if r.prior_weight == 0]
    for job in prior_jobs:
        job.get()
    run_jobs += [(r, pool.apply_async(train_and_evaluate, (r, s, work))) for r, s in tasks if r.prior_weight > 0]
    baselines = {subject: (scores, ceiling) for subject, scores, ceiling in (job.get() for job in baseline_jobs)}
    rows = []
    for run, job in run_jobs:
        try:
            row = job.get()
        except Exception as error:  # noqa: BLE001 - one failed training is reported in its row; the grid goes on
            row = {**asdict(run), "error": f"{type(error).__name__}: {' '.join(str(error).split())}"[:300]}
        else:
            base_class = baselines[row["subject"]][0]["class"]["readings"]
            row["class_diversity_tv"] = round(diversity_distance(row.pop("class_readings"), base_class), 3)
            if "chosen" in row:
                chosen = row["chosen"]
                chosen["class_diversity_tv"] = round(diversity_distance(chosen.pop("class_readings"), base_class), 3)
        rows.append(row)
        on_row(row)
    return baselines, rows


def run_bench(quick: bool, settings: Settings, workers: int = 2, machine: str = "", work: Path | None = None,
              on_row=lambda row: None, seeds=None) -> dict:
    """Run every task of the plan on `workers` processes and return the report (rows, summary, ceilings)."""
    tasks = [(run, settings) for run in plan(quick, settings.text_encoder, seeds)]
    report = run_tasks(tasks, workers, machine, work, on_row)
    report["summary"] = summarise(report["runs"])
    return report


def run_tasks(tasks: list[tuple[Run, Settings]], workers: int = 2, machine: str = "", work: Path | None = None,
              on_row=lambda row: None) -> dict:
    """Train and score each (run, settings) on `workers` processes; the report without a summary. The runs'
    libraries (their adapters) and the class images stay in `work` when it is given; a temporary folder made here
    is removed at the end."""
    started = time.time()
    if work is None:
        with tempfile.TemporaryDirectory(prefix="dbl-quality-") as folder:
            return run_tasks(tasks, workers, machine, Path(folder), on_row)
    work = Path(work)
    runs = [run for run, _ in tasks]
    pool = multiprocessing.get_context("spawn").Pool(workers, initializer=start_worker)
    try:
        baselines, rows = _run_tasks(pool, tasks, work, on_row)
        pool.close()  # a clean exit: no leaked semaphores, workers end on their own
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    order = {run: index for index, run in enumerate(runs)}
    rows.sort(key=lambda r: order[Run(r["subject"], r["prior_weight"], r["seed"], r["text_encoder"], r["variant"])])
    return {
        "model": MODEL, "samples_per_prompt": tasks[0][1].samples, "machine": machine, "workers": workers,
        "vae_ceiling": {s: ceiling for s, (_, ceiling) in baselines.items()},
        "base": {s: {"leak": scores["class"]["subject"], "fidelity": scores["instance"]["subject"],
                     "recontext": scores["recontext"]["background"], "class_diversity_floor": round(scores["class_floor"], 3)}
                 for s, (scores, _) in baselines.items()},
        "class_samples": tasks[0][1].samples * CLASS_SAMPLES_FACTOR,
        "runs": rows, "seconds": round(time.time() - started, 1),
    }
