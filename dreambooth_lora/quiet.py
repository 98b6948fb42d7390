"""Quiet third-party output: notices a person cannot act on are dropped; real warnings stay.

`drop_notices` runs when the package is imported (dreambooth_lora/__init__.py), before anything imports
peft, which imports bitsandbytes, which logs its notice at import time. `quiet_libraries` is for
commands: no hub access, no loading bars, library warnings at error level.
"""

from __future__ import annotations

import logging
import os
import sys

# logger name -> message prefixes to drop. Each is a notice about an optional speed-up we never install.
NOTICES = {
    # bitsandbytes on AVX-512 BF16 CPUs: an optional kernel package, whose loader downloads from a model hub.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
    # transformers without torchvision (its CPU wheels are not in the registry): the PIL image processors
    # it falls back to are the ones we use anyway.
    "transformers.utils.import_utils": ("`CLIPImageProcessor` requires torchvision",
                                        "`SiglipImageProcessor` requires torchvision"),
}


class _DropNotices(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def drop_notices() -> None:
    """Install the filters once (idempotent); loggers are created on first use, so this may run early."""
    for name, prefixes in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotices) for f in logger.filters):
            logger.addFilter(_DropNotices(prefixes))


_asked = False  # quiet_libraries ran in this process


def quiet_libraries() -> None:
    """For commands: never reach for a model hub; no loading bars; library warnings only at error level.

    Through the libraries' own environment switches, so that a command that never loads a model (`library list`,
    `jobs list`) does not import diffusers and transformers (3 s on this project's CPU machine) just to quiet them.
    diffusers' loading bars have no switch: `quiet_diffusers` turns them off where models are loaded (models.py).
    A setting a person exported stays theirs (for a library this process has not imported yet).
    """
    global _asked
    _asked = True
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                        ("TRANSFORMERS_VERBOSITY", "error"), ("DIFFUSERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    if "transformers" in sys.modules:  # imported before we were asked: its settings were read already
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        transformers_logging.set_verbosity_error()
    if "diffusers" in sys.modules:
        quiet_diffusers()


def quiet_diffusers() -> None:
    """diffusers' loading bars and log level, if quiet_libraries was asked for (called once diffusers is imported)."""
    if not _asked:
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
