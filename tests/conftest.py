"""Shared fixtures: isolated data folders, a tiny-random model builder and small subject photos.

Fixture names are specific (`tiny_random_builder`, `subject_images`, ...), except `model`: a
read-only tiny-random per module. A test file that defines its own `model`, `root` or `library`
fixture keeps it.
"""

from __future__ import annotations

import os
from pathlib import Path

# Test processes share 2 cores with the servers and workers they start: OpenMP threads sleep instead of
# spinning while waiting (read once, when torch loads, so before any import of torch).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dreambooth_lora.models import BaseModel, build_tiny_random, load_base_model  # noqa: E402

# One intra-op thread: on the shared 2-core machine torch's default (a thread per core) made a
# 30-step tiny-random run take 220 s instead of 8 s, and was still ~20% slower with passive waits.
torch.set_num_threads(int(os.environ.get("DBL_TEST_THREADS", "1")))


@pytest.fixture(scope="session", autouse=True)
def isolated_data_dirs(tmp_path_factory):
    """Point DBL_HOME and DBL_PRIOR_DIR at temporary folders, so no test writes into the repo."""
    saved = {key: os.environ.get(key) for key in ("DBL_HOME", "DBL_PRIOR_DIR", "HF_HUB_OFFLINE")}
    home = tmp_path_factory.mktemp("dbl_home")
    os.environ["DBL_HOME"] = str(home)
    os.environ["DBL_PRIOR_DIR"] = str(tmp_path_factory.mktemp("dbl_prior"))
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a model hub
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_random_builder():
    """Build a fresh builtin:tiny-random (~0.2 s); fresh each call because tests attach LoRA to it."""

    def build() -> BaseModel:
        return build_tiny_random()

    return build


@pytest.fixture(scope="module")
def model() -> BaseModel:
    """One builtin:tiny-random per test module, for tests that only read it (no LoRA attached)."""
    return load_base_model("builtin:tiny-random")


@pytest.fixture(scope="session")
def builtin_unet_layers() -> int:
    """The UNet LoRA layers a built-in's default run puts on tiny-random: its 4 transformer blocks times the
    projections the built-ins' default --unet-layers names (config.defaults_for, lora.UNET_LAYERS)."""
    from dreambooth_lora.config import defaults_for
    from dreambooth_lora.lora import UNET_LAYERS

    return 4 * len(UNET_LAYERS[defaults_for(True, 1, 64)["unet_layers"]])


@pytest.fixture(scope="session")
def session_prior_dir(tmp_path_factory) -> Path:
    """A class-image cache shared by the session, so each (prompt, size) set is generated once."""
    return tmp_path_factory.mktemp("shared_prior")


def write_subject_image(path: Path, index: int, size: tuple[int, int] = (40, 36)) -> Path:
    """A small photo-like PNG: a coloured square on a plain background, different per index."""
    rng = np.random.default_rng(index)
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = rng.integers(40, 220, 3, dtype=np.uint8)
    side = min(width, height) // 2
    left, top = rng.integers(0, width - side + 1), rng.integers(0, height - side + 1)
    pixels[top : top + side, left : left + side] = (200, 40 + 30 * (index % 5), 30)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


@pytest.fixture
def make_subject_images(tmp_path):
    """Return a function writing `count` subject PNGs into tmp_path/<folder> and returning their paths."""

    def make(count: int = 3, folder: str = "subject", size: tuple[int, int] = (40, 36)) -> list[Path]:
        target = tmp_path / folder
        target.mkdir(parents=True, exist_ok=True)
        return [write_subject_image(target / f"photo{i}.png", i, size) for i in range(count)]

    return make


@pytest.fixture
def subject_images(make_subject_images) -> list[Path]:
    """Three small subject PNGs in tmp_path/subject."""
    return make_subject_images(3)


@pytest.fixture(scope="session")
def session_subject_images(tmp_path_factory) -> list[Path]:
    """Three subject PNGs shared by module-scoped fixtures (read-only: training copies them)."""
    folder = tmp_path_factory.mktemp("session_subject")
    return [write_subject_image(folder / f"photo{i}.png", i) for i in range(3)]
