"""Recent generations under a data root: each one's images and settings in a folder of its own, and a zip of it.

`generations/<id>/` holds the PNGs (each with its settings in a text chunk, as generate.save_images writes them)
and `generation.json` (prompt, adapters and weights, seed, steps, guidance, size, base model, time taken). A
generation is written into a staging folder and renamed into place, so a crash leaves it whole or absent; only the
newest KEEP are kept.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .generate import GenerateSettings, save_images
from .library import new_id
from .paths import atomic_path, atomic_write_bytes

FOLDER = "generations"
RECORD_FILE = "generation.json"
KEEP = 30  # a few sessions of work; older generations are deleted as new ones arrive


@dataclass(frozen=True)
class Generation:
    id: str
    created: float
    settings: GenerateSettings
    base_model: str
    seconds: float
    folder: Path

    @property
    def images(self) -> list[Path]:
        return sorted(self.folder.glob("image-*.png"))

    @property
    def zip_name(self) -> str:
        return f"generation-{self.id}.zip"


def record_generation(root: Path, images, settings: GenerateSettings, base_model: str, seconds: float,
                      keep: int = KEEP) -> Generation:
    """Save a generation's images and settings under `root`/generations/ (all or nothing); drop the oldest past `keep`."""
    folder = Path(root) / FOLDER
    staging = folder / f".staging-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    generation_id = new_id()
    record = {"id": generation_id, "created": time.time(), "settings": asdict(settings), "base_model": base_model,
              "seconds": round(seconds, 2)}
    try:
        save_images(images, staging, settings, base_model)
        atomic_write_bytes(staging / RECORD_FILE, json.dumps(record, indent=1).encode())
        staging.rename(folder / generation_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in recent_generations(root, limit=None)[keep:]:
        shutil.rmtree(old.folder, ignore_errors=True)
    return read_generation(folder / generation_id)


def read_generation(folder: Path) -> Generation:
    record = json.loads((folder / RECORD_FILE).read_text())
    settings = record["settings"]
    settings["adapters"] = tuple(tuple(pair) for pair in settings.get("adapters", ()))
    return Generation(record["id"], record["created"], GenerateSettings(**settings), record["base_model"],
                      record["seconds"], folder)


def recent_generations(root: Path, limit: int | None = 10) -> list[Generation]:
    """Newest first; folders without a readable record (a staging folder, a hand-edited file) are skipped."""
    found = []
    for folder in (Path(root) / FOLDER).glob("*"):
        if folder.name.startswith(".") or not (folder / RECORD_FILE).is_file():
            continue
        try:
            found.append(read_generation(folder))
        except (ValueError, KeyError, TypeError):
            continue
    found.sort(key=lambda g: (g.created, g.id), reverse=True)
    return found if limit is None else found[:limit]


def get_generation(root: Path, generation_id: str) -> Generation | None:
    """The generation with this id, or None (ids come from the page, so they are matched, never joined into a path)."""
    return next((g for g in recent_generations(root, limit=None) if g.id == generation_id), None)


def zip_generation(generation: Generation) -> Path:
    """A zip of the generation's images and its settings (written once, atomically, inside its folder)."""
    path = generation.folder / generation.zip_name
    if not path.exists():
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
                for image in generation.images:
                    archive.write(image, image.name)
                archive.write(generation.folder / RECORD_FILE, RECORD_FILE)
    return path
