"""Speed and memory, side by side with diffusers' own DreamBooth-LoRA trainer, in one run on one model folder.

    python bench/speed.py --device cpu               # builtin:sd15-toy at 64 px (the CPU target)
    python bench/speed.py --device cuda --rank 4     # builtin:sd15-random at 512 px, bf16

Both trainers run as child processes with the machine's default threads and OpenMP policy, on the same saved
folder, with the same settings (steps, rank, batch 1 + 1, lr 1e-4, 4 class images, resolution, seed 0, identifier
embedding off) and an empty class-image cache each. Steady-state steps/s skips a warm-up of max(1, steps // 10)
steps in both. Before each child it samples the CPUs' idle share for 2 s and warns when under 90 %: on a shared
machine another process turns both trainers' figures into noise (README "Speed"). Ours draws no sample images (`--no-samples`), as the reference draws none without a
--validation_prompt; `--with-samples` keeps ours drawing its 4. Each child's start records the 1-minute load
average, and the reference's own figure (run_reference.sh's "steady ... after step 1") is kept beside the bench's,
so a standalone run_reference.sh can be checked against it. `--json` prints one JSON object instead of the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# H100 / H200 SXM dense bf16 peak (NVIDIA's data sheets); the MFU divides by it.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
LOADS: list[float] = []  # the 1-minute load average as each child starts (a busy machine makes figures incomparable)
IDLE: list[float | None] = []  # the share of CPU time idle over the 2 s before each child starts (Linux)


def cpu_idle(seconds: float = 2.0) -> float | None:
    """The share of all CPUs' time spent idle over `seconds` (from /proc/stat): under 0.9 something else is running,
    and with OpenMP's default (spinning) waits on as many threads as cores, both trainers then slow down unevenly."""
    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:9]]
        return sum(values), values[3] + values[4]
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return None
    return (idle1 - idle0) / max(1, total1 - total0)


def default_reference() -> Path | None:
    """The peer beside the repo (../shared/peer), or inside it on the device machine (./shared/peer)."""
    # .whl/peer: where scripts/device_speed.sh expects a copy carried to the GPU machine
    for candidate in (REPO.parent / "shared" / "peer", REPO / "shared" / "peer", REPO / ".whl" / "peer"):
        if (candidate / "run_reference.sh").exists():
            return candidate / "train_dreambooth_lora.py"
    return None


def make_instance_photos(folder: Path, res: int) -> list[Path]:
    """Three coloured photos of different sizes (the reference runner's own kind), given to both trainers."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    looks = [((200, 40, 40), (250, 220, 60), (1.5, 1.5)), ((40, 160, 60), (20, 20, 120), (1.25, 1.1)),
             ((40, 70, 200), (240, 240, 240), (1.0, 1.4))]
    paths = []
    for i, (background, foreground, (sw, sh)) in enumerate(looks):
        size = (int(res * sw), int(res * sh))
        image = Image.new("RGB", size, background)
        draw = ImageDraw.Draw(image)
        draw.ellipse([size[0] // 5, size[1] // 4, size[0] * 4 // 5, size[1] * 3 // 4], fill=foreground)
        draw.rectangle([4 + 6 * i, 4, 18 + 6 * i, 18], fill=(0, 0, 0))
        paths.append(folder / f"dog{i}.png")
        image.save(paths[-1])
    return paths


def run_child(cmd: list[str], env: dict, log: Path) -> tuple[int, float, int, str]:
    """Run a child to exit: exit code, wall seconds, peak RSS in bytes (it and its descendants), its output."""
    IDLE.append(cpu_idle())
    LOADS.append(round(os.getloadavg()[0], 2))
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, time.perf_counter() - started, usage.ru_maxrss * 1024, log.read_text(errors="replace")


def steady_rate(ends: list[tuple[int, float]], steps: int) -> float:
    """Steps per second after the warm-up: from the first (step, time) at or past it to the last step."""
    warm = max(1, steps // 10)
    start = next((n, t) for n, t in ends if n >= warm)
    last = max(ends)
    return (last[0] - start[0]) / (last[1] - start[1]) if last[1] > start[1] else float("nan")


def median_step_rate(ends: list[tuple[int, float]], steps: int) -> float:
    """1 / the median time between consecutive steps after the warm-up: on a machine whose speed changes for seconds at
    a time (this project's 2-core VM: steps of 80-90 ms and of 120-135 ms in one run), steadier than the mean."""
    import statistics

    warm = max(1, steps // 10)
    times = dict(ends)
    gaps = [times[n] - times[n - 1] for n in sorted(times) if n > warm and n - 1 in times]
    return 1.0 / statistics.median(gaps) if gaps else float("nan")


def run_ours(args, model_dir: Path, photos: list[Path], work: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    env.pop("OMP_WAIT_POLICY", None)  # the default policy: what a user's training process gets
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, "-m", "dreambooth_lora.cli", "train", "--images", *map(str, photos), "--token", "sks",
           "--class-noun", "dog", "--base-model", str(model_dir), "--steps", str(args.steps), "--rank", str(args.rank),
           "--batch-size", "1", "--lr", "1e-4", "--num-class-images", str(args.num_class), "--resolution", str(args.res),
           "--no-train-token-embedding", "--seed", "0", "--device", args.device, "--mixed-precision", args.precision,
           "--data-root", str(work / "data"), "--prior-dir", str(work / "prior"), "--quiet", "--timings", *args.ours_flag]
    if not args.with_samples:
        cmd.append("--no-samples")
    rc, wall, rss, output = run_child(cmd, env, work / "ours.log")
    if rc != 0:
        raise SystemExit(f"our trainer failed (rc={rc}):\n{output[-3000:]}")
    result = json.loads(output.strip().splitlines()[-1])
    t = result["timings"]
    ends = list(enumerate(t["step_ends"], start=1))
    return {
        "steps_per_s": steady_rate(ends, args.steps), "median_steps_per_s": median_step_rate(ends, args.steps),
        "class_images_per_s": t["class_images"] / t["class_images_seconds"] if t["class_images"] else None,
        "wall_s": wall, "peak_rss_gib": rss / 2**30,
        "peak_gpu_gib": t["peak_gpu_bytes"] / 2**30 if "peak_gpu_bytes" in t else None,
        "final_loss": result["final_loss"],
    }


def run_reference(args, model_dir: Path, photos: list[Path], work: Path) -> dict:
    script = Path(args.reference)
    runner = script.parent / "run_reference.sh"
    # A persistent work dir: run_reference.sh keeps its private torchvision there between runs.
    ref_work = Path(os.environ.get("DBL_BENCH_REF_WORK", Path(tempfile.gettempdir()) / "dbl-bench-reference"))
    precision = {"no": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision]
    env = {**os.environ, "MODEL_DIR": str(model_dir), "PY": sys.executable, "STEPS": str(args.steps),
           "RES": str(args.res), "RANK": str(args.rank), "NUM_CLASS": str(args.num_class), "BATCH": "1",
           "PRECISION": precision, "PRIOR_PRECISION": "fp32" if precision == "no" else precision,
           "DEVICE": args.device, "THREADS": str(os.cpu_count()), "INSTANCE_DIR": str(photos[0].parent),
           "KEEP_CLASS": "1" if args.keep_class else "0"}
    env.pop("OMP_WAIT_POLICY", None)
    rc, wall, rss, output = run_child(["bash", str(runner), str(ref_work)], env, work / "reference.log")
    if rc != 0:
        raise SystemExit(f"reference failed (rc={rc}):\n{output[-3000:]}")
    # Re-read its timestamped log, so both trainers' figures come from one definition.
    frames, class_frames = [], []
    for line in (ref_work / "train.log").read_text(encoding="utf-8").splitlines():
        stamp, _, text = line.partition(" ")
        if match := re.search(r"Steps:\s+\d+%\|.*?\|\s*(\d+)/(\d+)", text):
            frames.append((int(match.group(1)), float(stamp)))
        if "Generating class images:" in text:
            class_frames.append((float(stamp), "100%" in text))
    ends = sorted({n: t for n, t in reversed(frames) if n > 0}.items())  # the first frame that shows each count
    class_seconds = next(t for t, done in class_frames if done) - class_frames[0][0] if class_frames else None
    gpu = re.search(r"peak GPU memory: ([0-9.]+) GiB", output)
    loss = re.search(r"final loss ([0-9.e+-]+)", output)
    own = re.search(r"steady ([0-9.]+) steps/s after step", output)
    own_wall = re.search(r"total wall \(process start to exit.*?\): ([0-9.]+) s", output)
    return {
        "own_steady_steps_per_s": float(own.group(1)) if own else None,  # run_reference.sh's figure: from step 1
        "steps_per_s": steady_rate(ends, args.steps), "median_steps_per_s": median_step_rate(ends, args.steps),
        "class_images_per_s": args.num_class / class_seconds if class_seconds else None,
        # the peer process alone, start to exit (as ours: one process), not run_reference.sh's own checks around it
        "wall_s": float(own_wall.group(1)) if own_wall else wall, "runner_wall_s": wall, "peak_rss_gib": rss / 2**30, "peak_gpu_gib": float(gpu.group(1)) if gpu else None,
        "final_loss": float(loss.group(1)) if loss else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default=None, help="built-in to save and use (default: sd15-toy on cpu, sd15-random on cuda)")
    parser.add_argument("--model-dir", default=None, help="use this diffusers folder instead of saving the built-in")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--res", type=int, default=None, help="default 64 on cpu, 512 on cuda")
    parser.add_argument("--num-class", type=int, default=4)
    parser.add_argument("--precision", default=None, help="no on cpu (default), bf16 on cuda (default) or fp16")
    parser.add_argument("--reference", default=None, help="diffusers' train_dreambooth_lora.py beside run_reference.sh")
    parser.add_argument("--skip-reference", action="store_true", help="time our trainer alone")
    parser.add_argument("--ours-flag", action="append", default=[], help="extra flag for our train command (repeatable)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak for the MFU")
    parser.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep-class", action="store_true",
                        help="reuse both trainers' class images from the last run in --work (times training alone)")
    parser.add_argument("--with-samples", action="store_true",
                        help="let ours draw its 4 sample images after saving (the reference draws none)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run ours and the reference N times, alternating, and report each figure's median")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.model = args.model or ("builtin:sd15-random" if cuda else "builtin:sd15-toy")
    args.res = args.res or (512 if cuda else 64)
    args.precision = args.precision or ("bf16" if cuda else "no")
    args.reference = args.reference or default_reference()
    if not args.skip_reference and not args.reference:
        raise SystemExit("no reference trainer found (../shared/peer or ./shared/peer); pass --reference or --skip-reference")

    work = Path(args.work or tempfile.mkdtemp(prefix="dbl-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    if not args.keep_class:
        shutil.rmtree(work / "prior", ignore_errors=True)  # an empty class-image cache, as the reference starts with
    model_dir = Path(args.model_dir) if args.model_dir else work / "model"
    if not (model_dir / "model_index.json").exists():
        from dreambooth_lora.builtin_configs import save_builtin

        save_builtin(args.model, model_dir, device="cuda" if cuda else "cpu")
    photos = make_instance_photos(work / "instance", args.res)

    report = {"device": args.device, "machine": machine(cuda), "model": args.model, "steps": args.steps,
              "rank": args.rank, "res": args.res, "precision": args.precision, "threads": os.cpu_count(),
              "ours_flags": args.ours_flag, "repeat": args.repeat, "runs": []}
    for index in range(args.repeat):  # alternating, so a slow spell of the machine hits both
        # A fresh library each run, also in a reused --work: a library that holds a frozen-identifier adapter refuses
        # a second one with the same identifier (README "Quality", identifiers).
        shutil.rmtree(work / "data", ignore_errors=True)
        if index and not args.keep_class:
            shutil.rmtree(work / "prior", ignore_errors=True)
        run = {"ours": run_ours(args, model_dir, photos, work)}
        if not args.skip_reference:
            run["reference"] = run_reference(args, model_dir, photos, work)
        report["runs"].append(run)
    for who in report["runs"][0]:
        report[who] = {key: median([run[who][key] for run in report["runs"]]) for key in report["runs"][0][who]}
    if not args.skip_reference:
        ours, ref = report["ours"], report["reference"]
        report["ratios"] = {
            "steps_per_s": ours["steps_per_s"] / ref["steps_per_s"],
            "median_steps_per_s": ours["median_steps_per_s"] / ref["median_steps_per_s"],
            "wall_speedup": ref["wall_s"] / ours["wall_s"],
            "class_images_per_s": (ours["class_images_per_s"] / ref["class_images_per_s"]
                                   if ours["class_images_per_s"] and ref["class_images_per_s"] else None),
            "peak_memory": (ours["peak_gpu_gib"] / ref["peak_gpu_gib"] if cuda and ref["peak_gpu_gib"]
                            else ours["peak_rss_gib"] / ref["peak_rss_gib"]),
        }
    report["load_average_at_start"] = LOADS  # one per child, in the order they ran (ours first)
    report["cpu_idle_before"] = IDLE
    report["busy"] = any(idle is not None and idle < 0.9 for idle in IDLE)
    report["ours_samples"] = bool(args.with_samples)
    if cuda:
        from diffusers import UNet2DConditionModel

        from dreambooth_lora.step_cost import step_flops

        # batch 1 + 1: two rows; the VAE's 8x downsampling
        flops = step_flops(UNet2DConditionModel.load_config(model_dir / "unet"), args.rank, args.res // 8, 2)
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in report["machine"]), None)
        report["step_tflop"] = flops / 1e12
        report["peak_tflops"] = peak
        for who in ("ours", "reference"):
            if who in report and peak:
                report[who]["mfu"] = flops * report[who]["steps_per_s"] / (peak * 1e12)
    print(json.dumps(report, indent=1) if args.json else table(report))
    return 0


def median(values: list):
    """The median of the numbers (None when there are none); non-numbers: the first run's."""
    import statistics

    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(values):
        return values[0]
    return statistics.median(numbers) if numbers else None


def machine(cuda: bool) -> str:
    import platform

    if cuda:
        import torch

        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def table(report: dict) -> str:
    rows = [f"{report['model']} {report['res']} px, rank {report['rank']}, {report['steps']} steps, "
            f"{report['precision']}, on {report['machine']}"]
    keys = ["steps_per_s", "median_steps_per_s", "own_steady_steps_per_s", "class_images_per_s", "runner_wall_s", "wall_s", "peak_rss_gib", "peak_gpu_gib", "mfu"]
    rows.append(f"{'':22}{'ours':>12}{'reference':>12}{'ratio':>10}")
    for key in keys:
        ours, ref = report["ours"].get(key), report.get("reference", {}).get(key)
        if ours is None and ref is None:
            continue
        ratio = report.get("ratios", {}).get({"wall_s": "wall_speedup", "peak_rss_gib": "peak_memory",
                                              "peak_gpu_gib": "peak_memory"}.get(key, key))
        fmt = lambda v: "-" if v is None else f"{v:.3g}"
        rows.append(f"{key:22}{fmt(ours):>12}{fmt(ref):>12}{fmt(ratio) if ratio else '':>10}")
    rows.append(f"{report['repeat']} run(s) each, alternating; each figure the median. 1-minute load average at each "
                f"start: {report['load_average_at_start']}; ours draws "
                f"{'its 4' if report['ours_samples'] else 'no'} sample images, the reference none")
    rows.append("CPU idle in the 2 s before each start: " + ", ".join(
        f"{idle:.0%}" for idle in report["cpu_idle_before"] if idle is not None))
    if report["busy"]:
        rows.append("WARNING: something else was using the CPUs before a trainer started; these figures are not comparable")
    if "step_tflop" in report:
        rows.append(f"one step: {report['step_tflop']:.2f} TFLOP; MFU against {report['peak_tflops']} TFLOP/s dense bf16")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
