"""DreamBooth-LoRA Studio: personalise Stable-Diffusion-style models with LoRA adapters."""

# No process-wide threading settings here: a process that trains keeps OpenMP's default wait policy (2-3x
# faster on 2 threads than passive waits). Processes that mostly wait choose passive waits themselves
# (cli.wait_passively: serve and the idle worker; tests/conftest.py).
from .quiet import drop_notices

drop_notices()  # before any submodule imports peft (and so bitsandbytes)

__version__ = "0.1.0"
