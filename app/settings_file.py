"""A job's settings as a file: export them from one job, import them into the Train form for another.

The file is JSON: {"format": FORMAT, "version": 1, "settings": the TrainConfig fields}. Settings left at their
default stay so in the file (steps None: the base model's default), so a file means the same on another model.
Import checks everything before the form changes and says what is wrong in the studio's field names.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from dreambooth_lora.config import TrainConfig
from dreambooth_lora.errors import UserError
from dreambooth_lora.jobs import Job
from dreambooth_lora.paths import atomic_write_bytes

FORMAT = "dreambooth-lora-studio/train-settings"
VERSION = 1
MAX_BYTES = 64 * 1024  # a settings file is a few hundred bytes; anything far larger is not one
FIELDS = {f.name for f in fields(TrainConfig)}


def settings_document(job: Job) -> dict:
    return {"format": FORMAT, "version": VERSION, "job": job.id, "settings": job.train_config().to_dict()}


def export_settings(job: Job, folder: Path) -> Path:
    """Write `<job name>.settings.json` into `folder` (atomically) and return its path."""
    path = Path(folder) / f"{job.name or job.id}.settings.json"  # job names were validated when it was created
    atomic_write_bytes(path, json.dumps(settings_document(job), indent=1, sort_keys=True).encode())
    return path


def read_settings(path: Path) -> TrainConfig:
    """The TrainConfig a settings file holds, or a UserError saying what is wrong with the file."""
    path = Path(path)
    label = path.name
    if path.stat().st_size > MAX_BYTES:
        raise UserError(f"{label} is {path.stat().st_size // 1024} KB: not a settings file (they are a few hundred "
                        "bytes; use a file from Export settings).")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{label} is not a text file: choose a .settings.json file from Export settings.") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{label} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
                        "choose a file from Export settings.") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise UserError(f"{label} is not a studio settings file (its \"format\" is not {FORMAT!r}); "
                        "choose a file from Export settings.")
    if document.get("version") != VERSION:
        raise UserError(f"{label} has settings version {document.get('version')!r}; this studio reads version {VERSION}.")
    settings = document.get("settings")
    if not isinstance(settings, dict):
        raise UserError(f"{label} has no \"settings\" object.")
    unknown = sorted(set(settings) - FIELDS)
    if unknown:
        raise UserError(f"{label} has settings this studio does not know: {', '.join(unknown)}.")
    missing = [name for name in ("token", "class_noun", "base_model") if not settings.get(name)]
    if missing:
        raise UserError(f"{label} lacks {', '.join(missing)}.")
    for name, value in settings.items():
        problem = _kind_problem(value, ANNOTATIONS[name])
        if problem:
            raise UserError(f"{label}: {name} must be {problem} (it is {value!r}).")
    return TrainConfig(**settings)  # its own checks name each field (app/views.py words them for the form)


ANNOTATIONS = {f.name: str(f.type) for f in fields(TrainConfig)}


def _kind_problem(value, annotation: str) -> str | None:
    """What kind of value the field takes, when `value` is not of it (JSON gives int, float, str, bool, list, None)."""
    if value is None:
        return None if "None" in annotation else "given"
    if annotation.startswith("tuple"):
        ok, kind = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of texts"
    elif annotation.startswith("bool"):
        ok, kind = isinstance(value, bool), "true or false"
    elif annotation.startswith("int"):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif annotation.startswith("float"):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, kind = isinstance(value, str), "text"
    return None if ok else kind
