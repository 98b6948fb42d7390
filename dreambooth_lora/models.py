"""Base models: built-in ones made from configs in code, hub ids, diffusers folders, single files."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .config import REAL_SHAPED_BUILTINS
from .errors import UserError
from .quiet import quiet_diffusers
from .tokenizer import build_tokenizer

quiet_diffusers()  # every pipeline is loaded here: no loading bars when a command asked for quiet

BUILTIN_DIR = Path(__file__).parent / "builtin"
DEFAULT_REAL_RESOLUTION = 512  # Stable Diffusion 1.x native size
TINY_RANDOM_RESOLUTION = 64


@dataclass
class BaseModel:
    """A loaded base model: its components by name, plus what adapters record about it."""

    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    fingerprint: str
    native_resolution: int

    def training_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler.from_config(self.scheduler_config)

    def sampling_scheduler(self) -> DPMSolverMultistepScheduler:
        # "leading" spacing matches how SD 1.x and our built-ins were trained; the default
        # "linspace" gave off outputs on the tiny world (docs/DESIGN.md, "The tiny world").
        return DPMSolverMultistepScheduler.from_config(self.scheduler_config, timestep_spacing="leading")

    def pipeline(self) -> StableDiffusionPipeline:
        pipe = StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.sampling_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def device(self) -> torch.device:
        return self.unet.device


def sd_scheduler_config() -> dict:
    """Stable Diffusion 1.x's noise schedule, used by every built-in model too."""
    return dict(
        DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            steps_offset=1,
            prediction_type="epsilon",
        ).config
    )


def build_tiny_random(seed: int = 0) -> BaseModel:
    """A complete SD-layout model with random weights, small enough for sub-second CPU steps."""
    with torch.random.fork_rng(devices=[]):  # seeded weights, and the caller's random state left alone
        torch.manual_seed(seed)
        return _build_tiny_random()


def _build_tiny_random() -> BaseModel:
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            architectures=["CLIPTextModel"],  # what save_pretrained records, so a saved copy keeps the fingerprint
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return assemble("builtin:tiny-random", unet, vae, text_encoder, tokenizer, sd_scheduler_config(), TINY_RANDOM_RESOLUTION)


def builtin_names() -> list[str]:
    names = ["builtin:tiny-random"]
    if (BUILTIN_DIR / "tiny-world" / "model_index.json").exists():
        names.insert(0, "builtin:tiny-world")
    return names


def default_base_model() -> str:
    """tiny-world once it ships with the package, tiny-random until then (docs/DESIGN.md, "Default base model")."""
    return builtin_names()[0]


def native_resolution(name: str) -> int | None:
    """The size a base model trains and generates at, without loading it: built-ins their own, others 512.

    None for a built-in name that is not shipped here: it has no size, and loading it fails with its own message.
    """
    if name == "builtin:tiny-random":
        return TINY_RANDOM_RESOLUTION
    if name.startswith("builtin:"):
        folder = BUILTIN_DIR / name.removeprefix("builtin:")
        if not (folder / "studio.json").exists():
            return None
        return int(json.loads((folder / "studio.json").read_text())["resolution"])
    return DEFAULT_REAL_RESOLUTION


def available_here(name: str) -> bool:
    """Whether `name` can be loaded here offline: a shipped built-in, an existing path, or a hub id in the local cache."""
    if name.startswith("builtin:"):
        return name in builtin_names()
    if Path(name).exists():
        return True
    if name.count("/") != 1 or name.startswith((".", "/")):
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "model_index.json"), str)
    except ValueError:  # not a valid hub id
        return False


def check_base_model(name: str, config_dir: str | None = None) -> None:
    """Refuse, in one sentence, a base model that load_base_model cannot load here offline; cheap (reads no weights).

    Called when a job is submitted, so a bad name is refused then rather than after it waited in the queue.
    """
    if name == "builtin:tiny-random" or name in REAL_SHAPED_BUILTINS:
        return
    if name.startswith("builtin:"):
        if not (BUILTIN_DIR / name.removeprefix("builtin:") / "model_index.json").exists():
            raise UserError(_unknown_builtin(name))
        return
    path = Path(name)
    if path.suffix in {".safetensors", ".ckpt"}:
        if path.suffix != ".safetensors":
            raise UserError(f"{name}: only .safetensors checkpoints are accepted (.ckpt files can run code when loaded).")
        if not path.is_file():
            raise UserError(f"Checkpoint file {name} does not exist.")
        if config_dir is None:
            raise UserError(f"{name} is a single-file checkpoint: pass --config DIR (a diffusers folder or cached hub "
                            "id of the same architecture) so its component configs can be read offline.")
        return
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(f"{name} is a folder but not a diffusers model (no model_index.json in it).")
        return
    if path.exists():
        raise UserError(f"{name} is neither a diffusers folder nor a .safetensors checkpoint.")
    if not available_here(name):
        raise UserError(f"Cannot load base model {name!r} offline: it is not a local folder and not in the Hugging "
                        "Face cache. Download it on a connected machine first or give a path.")


TOKENIZER_FILES = ("tokenizer.json", "vocab.json")  # a CLIP tokenizer's vocabulary: fast format, or the slow one's


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str, config_dir: str | None = None):
    """The base model's tokenizer alone (no weights read), for checks at submit; None when it cannot be read so
    cheaply (then load_base_model's own checks apply when training starts). It is shared: callers must not change
    it (identifier.tokenizer_with_tokens works on a copy)."""
    if name == "builtin:tiny-random":
        return build_tokenizer()
    if name in REAL_SHAPED_BUILTINS:
        from .builtin_configs import tokenizer_for_builtin

        return tokenizer_for_builtin()
    if name.startswith("builtin:"):
        source = str(BUILTIN_DIR / name.removeprefix("builtin:"))
    elif Path(name).suffix == ".safetensors":
        source = config_dir  # a single file's component configs (and tokenizer) come from --config
    else:
        source = name
    if source is None:
        return None
    folder = Path(source) / "tokenizer"
    if not Path(source).is_dir():  # a hub id: its cached tokenizer folder, if the cache has one
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = [try_to_load_from_cache(source, f"tokenizer/{file}") for file in TOKENIZER_FILES]
        except ValueError:  # not a valid hub id
            return None
        folder = next((Path(path).parent for path in cached if isinstance(path, str)), None)
    if folder is None or not any((folder / file).is_file() for file in TOKENIZER_FILES):
        return None
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None


def _unknown_builtin(name: str) -> str:
    known = builtin_names() + list(REAL_SHAPED_BUILTINS)
    return f"Unknown built-in model {name!r}; built-ins here: {', '.join(known)}."


def load_base_model(name: str, config_dir: str | None = None) -> BaseModel:
    """Load a base model by name (builtin:..., hub id, diffusers folder or .safetensors file), on CPU in fp32."""
    if name == "builtin:tiny-random":
        return build_tiny_random()
    if name in REAL_SHAPED_BUILTINS:
        from . import builtin_configs

        unet, vae, text_encoder, tokenizer, scheduler = builtin_configs.build_components(name)
        return assemble(name, unet, vae, text_encoder, tokenizer, dict(scheduler.config), builtin_configs.native_resolution(name))
    if name.startswith("builtin:"):
        folder = BUILTIN_DIR / name.removeprefix("builtin:")
        if not (folder / "model_index.json").exists():
            raise UserError(_unknown_builtin(name))
        resolution = native_resolution(name)
        return _from_pipeline(name, StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32), resolution)
    path = Path(name)
    if path.suffix in {".safetensors", ".ckpt"}:
        return _from_single_file(name, path, config_dir)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise UserError(f"{name} is a folder but not a diffusers model (no model_index.json in it).")
        return _from_pipeline(name, _pretrained(name), DEFAULT_REAL_RESOLUTION)
    if path.exists():
        raise UserError(f"{name} is neither a diffusers folder nor a .safetensors checkpoint.")
    return _from_pipeline(name, _pretrained(name), DEFAULT_REAL_RESOLUTION)


def _pretrained(name: str) -> StableDiffusionPipeline:
    try:
        return StableDiffusionPipeline.from_pretrained(
            name, dtype=torch.float32, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        raise UserError(
            f"Cannot load base model {name!r} offline: it is not a local folder and not in the Hugging Face "
            f"cache ({type(error).__name__}). Download it on a connected machine first or pass a path."
        ) from None


def _from_single_file(name: str, path: Path, config_dir: str | None) -> BaseModel:
    if path.suffix != ".safetensors":
        raise UserError(f"{name}: only .safetensors checkpoints are accepted (.ckpt files can run code when loaded).")
    if not path.exists():
        raise UserError(f"Checkpoint file {name} does not exist.")
    if config_dir is None:
        raise UserError(
            f"{name} is a single-file checkpoint: pass --config DIR (a diffusers folder or cached hub id of the "
            "same architecture) so its component configs can be read offline."
        )
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config_dir, local_files_only=True, dtype=torch.float32,
            safety_checker=None, requires_safety_checker=False,
        )
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"Cannot load checkpoint {name} with configs from {config_dir}: {error}".splitlines()[0]) from None
    return _from_pipeline(name, pipe, DEFAULT_REAL_RESOLUTION)


def _from_pipeline(name: str, pipe: StableDiffusionPipeline, resolution: int) -> BaseModel:
    return assemble(name, pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, dict(pipe.scheduler.config), resolution)


def assemble(name, unet, vae, text_encoder, tokenizer, scheduler_config, resolution) -> BaseModel:
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(
        name=name,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        fingerprint=fingerprint(unet, vae, text_encoder),
        native_resolution=resolution,
    )


def fingerprint(unet, vae, text_encoder) -> str:
    """Hash of the component configs and a fixed sample of weights, never of a name or path.

    Weights are rounded to fp16 before hashing so fp32 and fp16 loads of the same model agree.
    """
    digest = hashlib.sha256()
    for label, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        shape_keys = {k: v for k, v in config.items() if not k.startswith("_") and k not in {"torch_dtype", "dtype", "transformers_version"}}
        digest.update(label.encode())
        digest.update(json.dumps(shape_keys, sort_keys=True, default=str).encode())
        for param_name, param in sorted(module.state_dict().items()):
            if not param.is_floating_point():
                continue
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 16)][:16]
            digest.update(param_name.encode())
            digest.update(sample.to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()[:16]
