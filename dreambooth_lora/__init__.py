"""DreamBooth-LoRA Studio: personalise Stable-Diffusion-style models with LoRA adapters."""

import os

# OpenMP threads that spin while waiting make CPU training 10-100x slower whenever another
# process shares the cores (the UI's server and worker, a test run); sleeping threads do not.
# It must be set before torch loads its OpenMP runtime, hence here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .quiet import drop_notices

drop_notices()  # before any submodule imports peft (and so bitsandbytes)

__version__ = "0.1.0"
