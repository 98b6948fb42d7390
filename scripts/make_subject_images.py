"""Regenerates the shipped subject instance images (dreambooth_lora/tinyworld/subjects/<name>/<n>.png).

Deterministic: the scenes come from world.instance_scenes with a fixed seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from dreambooth_lora.tinyworld.world import SUBJECT_IMAGE_DIR, SUBJECTS, instance_scenes, render


def main() -> None:
    for name in SUBJECTS:
        folder = SUBJECT_IMAGE_DIR / name
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.png"):
            stale.unlink()
        for index, scene in enumerate(instance_scenes(name)):
            path = folder / f"{index}.png"
            render(scene).save(path, format="PNG", optimize=False)
            print(f"{path}: {scene}")


if __name__ == "__main__":
    main()
