"""The CLI in-process: train -> library -> generate end to end, library management, and every
bad input answered with status 2 and one sentence naming the file, flag or adapter."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_lora.adapter_file import AdapterFile, write_adapter
from dreambooth_lora.cli import main
from dreambooth_lora.config import TrainConfig
from dreambooth_lora.jobs import Jobs, JobStatus
from dreambooth_lora.library import Library
from dreambooth_lora.lora import attach_unet_lora, collect_adapter_tensors
from dreambooth_lora.models import build_tiny_random


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(capsys, argv, *named: str) -> str:
    """Status 2, exactly one `error:` line naming each of `named`, and no traceback."""
    code, _, err = run(capsys, *argv)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert "Traceback" not in err
    for text in named:
        assert text in errors[0], errors[0]
    return errors[0]


def add_untrained_adapter(library: Library, name: str, fingerprint: str | None = None):
    """A library adapter straight from attach_unet_lora (B = 0), without the cost of training."""
    model = build_tiny_random()
    attach_unet_lora(model.unet, rank=4, alpha=4.0)
    meta = {"id": library.new_adapter_id(), "name": name, "token": "sks", "class_noun": "dog",
            "base_model": model.name, "fingerprint": fingerprint or model.fingerprint, "rank": 4, "alpha": 4.0}
    staging = library.staging_folder()
    write_adapter(staging / "adapter.safetensors", AdapterFile.from_tensors(collect_adapter_tensors(model.unet), meta, 4.0))
    return library.add_adapter(staging, meta)


# ----- end to end -----

def test_train_list_generate_rename_show_delete(capsys, subject_images, tmp_path):
    data, prior, out = tmp_path / "data", tmp_path / "prior", tmp_path / "out"
    code, stdout, stderr = run(capsys, "train", "--images", *subject_images, "--token", "sks", "--class-noun", "dog",
                               "--base-model", "builtin:tiny-random", "--steps", 30, "--num-class-images", 4,
                               "--data-root", data, "--prior-dir", prior, "--quiet")
    assert code == 0, stderr
    summary = json.loads(stdout)
    name = summary["adapter"]
    assert name.startswith("sks-dog-") and summary["final_loss"] > 0
    assert len(list(prior.glob("*/*/*.png"))) == 4

    code, stdout, _ = run(capsys, "library", "list", "--json", "--data-root", data)
    listed = json.loads(stdout)
    assert code == 0 and [entry["name"] for entry in listed] == [name]
    assert listed[0]["base_model"] == "builtin:tiny-random" and listed[0]["steps"] == 30 and len(listed[0]["samples"]) == 4

    code, stdout, stderr = run(capsys, "generate", "--prompt", "a photo of sks dog", "--adapter", f"{name}=1.0",
                               "--num-images", 2, "--steps", 4, "--out", out, "--data-root", data)
    assert code == 0, stderr
    written = [Path(line) for line in stdout.split()]
    assert written == sorted(out.glob("image-*.png")) and len(written) == 2
    for index, path in enumerate(written):
        with Image.open(path) as image:
            assert image.size == (64, 64)  # tiny-random's native size
            parameters = json.loads(image.text["parameters"])
        assert parameters["prompt"] == "a photo of sks dog" and parameters["steps"] == 4
        assert parameters["adapters"] == [[name, 1.0]] and parameters["seed"] == index
        assert parameters["base_model"] == "builtin:tiny-random"

    assert run(capsys, "library", "rename", name, "my dog", "--data-root", data)[:2] == (0, "my dog\n")
    code, stdout, _ = run(capsys, "library", "show", "my dog", "--data-root", data)
    shown = json.loads(stdout)
    assert code == 0 and shown["name"] == "my dog" and shown["meta"]["name"] == "my dog" and shown["token"] == "sks"
    assert json.loads((Path(shown["file"]).parent / "meta.json").read_text())["name"] == "my dog"
    assert_refused(capsys, ["library", "rename", "my dog", "../x", "--data-root", data], "'../x'")
    assert_refused(capsys, ["library", "show", name, "--data-root", data], repr(name), "my dog")  # the old name is gone

    assert run(capsys, "library", "delete", "my dog", "--data-root", data)[0] == 0
    assert not Path(shown["file"]).exists()
    assert json.loads(run(capsys, "library", "list", "--json", "--data-root", data)[1]) == []
    assert_refused(capsys, ["generate", "--prompt", "x", "--adapter", "my dog", "--data-root", data], "'my dog'")


def test_without_data_root_the_environment_folder_is_used(capsys, isolated_data_dirs):
    repo_db = Path.cwd() / "studio_data" / "library.db"
    before = repo_db.stat().st_mtime_ns if repo_db.exists() else None
    code, stdout, _ = run(capsys, "library", "list", "--json")
    assert code == 0 and json.loads(stdout) == []
    assert Path(os.environ["DBL_HOME"]) == isolated_data_dirs and (isolated_data_dirs / "library.db").exists()
    assert (repo_db.stat().st_mtime_ns if repo_db.exists() else None) == before  # the working copy is untouched


# ----- refusals: status 2, one line -----

def png_claiming_size(path: Path, width: int, height: int) -> Path:
    Image.new("1", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def cli_dirs(tmp_path):
    return ["--data-root", tmp_path / "data", "--prior-dir", tmp_path / "prior"]


def train_args(images, *extra) -> list:
    return ["train", "--images", *images, "--token", "sks", "--class-noun", "dog",
            "--base-model", "builtin:tiny-random", "--steps", 2, "--quiet", *extra]


def test_bad_images_refused(capsys, subject_images, cli_dirs, tmp_path):
    two = subject_images[:2]
    assert_refused(capsys, train_args(two, *cli_dirs), "at least 3 images", "got 2")
    (tmp_path / "notes.png").write_text("hello")
    assert_refused(capsys, train_args(two + [tmp_path / "notes.png"], *cli_dirs), "notes.png", "not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert_refused(capsys, train_args(two + [tmp_path / "empty.jpg"], *cli_dirs), "empty.jpg", "empty file")
    Image.effect_noise((64, 64), 60).convert("RGB").save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:700])
    assert_refused(capsys, train_args(two + [tmp_path / "cut.png"], *cli_dirs), "cut.png", "truncated")
    bomb = png_claiming_size(tmp_path / "bomb.png", 30000, 30000)
    assert_refused(capsys, train_args(two + [bomb], *cli_dirs), "bomb.png", "too large")
    assert_refused(capsys, train_args(two + [tmp_path / "gone.png"], *cli_dirs), "gone.png", "not found")
    # nothing was created for any of them
    assert Jobs(Library(cli_dirs[1])).list() == []


def test_tiny_and_extreme_photos_refused_in_one_message(capsys, subject_images, cli_dirs, tmp_path):
    for name, size in (("dot.png", (1, 1)), ("icon.png", (8, 8)), ("strip.png", (4000, 10))):
        Image.new("RGB", size, (90, 120, 150)).save(tmp_path / name)
    bad = [tmp_path / "dot.png", tmp_path / "icon.png", tmp_path / "strip.png"]
    # tiny-random trains at 64 px: the rule is a shorter side of at least 32 px and at most 4:1
    assert_refused(capsys, train_args(subject_images + bad, *cli_dirs), "dot.png: 1x1 px", "icon.png: 8x8 px",
                   "strip.png: 4000x10 px", "below 32 px (half the 64 px training resolution)", "4:1")
    # --resolution sets the rule: at 128 px the 40x36 photos themselves are too small
    assert_refused(capsys, train_args(subject_images, *cli_dirs, "--resolution", 128),
                   "photo0.png: 40x36 px", "photo2.png", "below 64 px")
    assert Jobs(Library(cli_dirs[1])).list() == []


@pytest.mark.parametrize(
    "extra,named",
    [
        (["--rank", "0"], ["--rank 0", "1 to 256"]),
        (["--text-encoder", "foo"], ["--text-encoder 'foo'", "none, lora, qlora"]),
        (["--prior-weight", "-1"], ["--prior-weight -1.0"]),
        (["--steps", "abc"], ["--steps", "'abc'"]),
        (["--lr", "0"], ["--lr 0.0"]),
        (["--resolution", "30"], ["--resolution 30", "multiple of 8"]),
        (["--name", "../x"], ["'../x'"]),
        (["--mixed-precision", "fp8"], ["--mixed-precision 'fp8'"]),
        (["--no-such-flag"], ["--no-such-flag"]),
    ],
)
def test_bad_flag_values_refused(capsys, subject_images, cli_dirs, extra, named):
    assert_refused(capsys, train_args(subject_images, *cli_dirs, *extra), *named)
    assert Jobs(Library(cli_dirs[1])).list() == []  # refused before any job exists


def test_train_needs_images_token_and_class(capsys, cli_dirs):
    assert_refused(capsys, ["train", "--token", "sks", *cli_dirs], "--images", "--class-noun")


@pytest.mark.parametrize(
    "base_model,named",
    [
        ("builtin:nope", ["'builtin:nope'", "builtin:tiny-random"]),
        ("{tmp}/model.safetensors", ["model.safetensors", "--config"]),
        ("{tmp}/no-such-folder", ["no-such-folder", "offline"]),
        ("{tmp}/plain-folder", ["plain-folder", "model_index.json"]),
    ],
)
def test_unusable_base_model_refused(capsys, make_subject_images, cli_dirs, tmp_path, base_model, named):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "plain-folder").mkdir()
    photos = make_subject_images(3, size=(256, 256))  # big enough for a real model's 512 px, so the model is what fails
    argv = train_args(photos, *cli_dirs, "--base-model", base_model.format(tmp=tmp_path))
    assert_refused(capsys, argv, *named)
    assert Jobs(Library(cli_dirs[1])).list() == []  # refused when submitted: no job is recorded


def test_resume_of_unknown_running_or_finished_job_refused(capsys, cli_dirs, subject_images):
    assert_refused(capsys, ["train", "--resume", "no-such-job", *cli_dirs], "'no-such-job'")
    jobs = Jobs(Library(cli_dirs[1]))
    config = TrainConfig(token="sks", class_noun="dog", base_model="builtin:tiny-random", steps=2)
    running = jobs.create(config, subject_images, status=JobStatus.RUNNING)  # this live process is its runner
    assert_refused(capsys, ["train", "--resume", running, *cli_dirs], running, "is running", f"pid {os.getpid()}")
    assert_refused(capsys, ["jobs", "delete", running, *cli_dirs], running, "cancel it first")
    jobs.update(running, status=JobStatus.DONE)
    assert_refused(capsys, ["train", "--resume", running, *cli_dirs], running, "is done")
    assert_refused(capsys, ["jobs", "resume", running, *cli_dirs], running, "is done")
    assert_refused(capsys, ["jobs", "cancel", running, *cli_dirs], running, "is done")
    jobs.update(running, status=JobStatus.FAILED, error="a mistake in its settings", error_kind="user")
    assert_refused(capsys, ["train", "--resume", running, *cli_dirs], running, "because of its settings")
    assert_refused(capsys, ["jobs", "resume", running, *cli_dirs], running, "because of its settings")


def test_generate_refusals(capsys, cli_dirs, tmp_path):
    library = Library(cli_dirs[1])
    add_untrained_adapter(library, "mine")
    add_untrained_adapter(library, "foreign", fingerprint="0123456789abcdef")
    corrupt = add_untrained_adapter(library, "corrupt")
    corrupt.file.write_bytes(corrupt.file.read_bytes()[:100])
    generate = ["generate", "--prompt", "a photo of sks dog", "--num-images", 1, "--steps", 1, "--size", 16,
                "--out", tmp_path / "out", *cli_dirs]
    assert_refused(capsys, [*generate, "--adapter", "ghost"], "'ghost'", "mine")
    assert_refused(capsys, [*generate, "--adapter", "mine=abc"], "'mine=abc'")
    assert_refused(capsys, [*generate, "--adapter", "mine=11"], "'mine=11'", "between -10 and 10")
    assert_refused(capsys, [*generate, "--adapter", "foreign"], "'foreign'", "0123456789abcdef")
    assert_refused(capsys, [*generate, "--adapter", "mine", "--base-model", "builtin:tiny-world"], "'mine'", "tiny-world")
    assert_refused(capsys, [*generate, "--adapter", "corrupt"], "adapter.safetensors", "not a readable safetensors")
    assert_refused(capsys, [*generate, "--adapter", "mine", "--size", 20], "--size 20")
    assert_refused(capsys, ["generate", "--prompt", " ", *cli_dirs], "--prompt")
    assert not (tmp_path / "out").exists()
    # the good one still works after all that
    assert run(capsys, *generate, "--adapter", "mine")[0] == 0 and len(list((tmp_path / "out").glob("*.png"))) == 1


def test_library_refusals(capsys, cli_dirs):
    add_untrained_adapter(Library(cli_dirs[1]), "one")
    add_untrained_adapter(Library(cli_dirs[1]), "two")
    assert_refused(capsys, ["library", "show", "nobody", *cli_dirs], "'nobody'")
    assert_refused(capsys, ["library", "delete", "nobody", *cli_dirs], "'nobody'")
    assert_refused(capsys, ["library", "rename", "one", "two", *cli_dirs], "'two'", "already exists")
    for bad in ["../x", "a/b", "", " lead", ".hidden"]:
        assert_refused(capsys, ["library", "rename", "one", bad, *cli_dirs], repr(bad))
    assert sorted(e.name for e in Library(cli_dirs[1]).list()) == ["one", "two"]


def test_listing_commands_load_no_model_library(tmp_path):
    """`library list` and `jobs list` read the database only: no torch, diffusers or transformers is imported, so
    they answer in well under a second rather than after seconds of imports (dreambooth_lora/jobs.py, quiet.py)."""
    import subprocess
    import sys

    script = ("import sys; from dreambooth_lora.cli import main; "
              f"codes = [main(['library', 'list', '--data-root', {str(tmp_path)!r}]), "
              f"main(['jobs', 'list', '--data-root', {str(tmp_path)!r}])]; "
              "print(codes, sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[0, 0] []", done.stdout + done.stderr
