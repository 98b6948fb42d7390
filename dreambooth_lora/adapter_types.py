"""Adapter types (LoRA, DoRA, LoHa, LoKr): one small class each, found by name in `ADAPTER_TYPES`.

An instance is one adapted layer's weights under PEFT's parameter names (what our file stores after
`unet.<module>.` / `text_encoder.<module>.`). Each class knows the PEFT config that attaches it to a model,
its delta weight, and its kohya/LyCORIS keys with the alpha conventions ComfyUI applies
(comfy/weight_adapter/{lora,loha,lokr}.py; docs/DESIGN.md, "Adapter types"). Shapes are checked against the
base layer's (out_features, in_features) with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.lokr.layer import factorization

from .errors import UserError

DEFAULT_TYPE = "lora"


class ShapeError(ValueError):
    """A tensor whose shape does not fit the base layer; the caller names the file and key."""


def _expect(name: str, tensor: torch.Tensor, shape: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ShapeError(f"{name} has shape {tuple(tensor.shape)}, the base layer needs {tuple(shape)}")


@dataclass
class LoRA:
    """delta W = (alpha / r) B A, B = up [out, r], A = down [r, in]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    name: ClassVar[str] = "lora"
    peft_keys: ClassVar[tuple] = ("lora_A.weight", "lora_B.weight")
    kohya_keys: ClassVar[tuple] = ("lora_down.weight", "lora_up.weight")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def update(self) -> torch.Tensor:
        """The low-rank matrix this type learns (what resize and rank analysis factorise), in fp64."""
        return self.scale * (self.up.double() @ self.down.double())

    def delta(self, base: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        """The change to the base weight at `strength` (the slider); linear in strength for every type but DoRA."""
        return strength * self.update()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.down, "lora_B.weight": self.up}

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @classmethod
    def from_tensors(cls, parts: dict, alpha: float, rank: int | None = None) -> "LoRA":
        return cls(parts["lora_A.weight"].float(), parts["lora_B.weight"].float(), float(alpha))

    @classmethod
    def missing(cls, parts: dict) -> str | None:
        """The first PEFT tensor this type needs that `parts` lacks."""
        return next((key for key in cls.peft_keys if key not in parts), None)

    @staticmethod
    def rank_of(parts: dict) -> int:
        return parts["lora_A.weight"].shape[0]

    def check(self, out_features: int, in_features: int) -> None:
        _expect("down (lora_A)", self.down, (self.rank, in_features))
        _expect("up (lora_B)", self.up, (out_features, self.rank))

    # kohya/LyCORIS: scale = alpha / rank, rank = lora_down's first dimension (ComfyUI lora.py)
    def kohya(self, common_alpha: float) -> dict[str, torch.Tensor]:
        # One alpha in the whole file keeps diffusers' kohya loader exact (formats.kohya_state_dict): fold the ratio into up.
        return {"lora_down.weight": self.down, "lora_up.weight": self.up * (self.alpha / common_alpha),
                "alpha": torch.tensor(float(common_alpha))}

    @classmethod
    def from_kohya(cls, parts: dict, out_features: int, in_features: int) -> "LoRA":
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() != 2 or up.dim() != 2:
            raise ShapeError(f"lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} are not matrices")
        layer = cls(down.float(), up.float(), _alpha(parts, down.shape[0]))
        layer.check(out_features, in_features)
        return layer

    @staticmethod
    def config(rank: int, alpha: float, targets: list[str], rank_pattern=None, alpha_pattern=None) -> LoraConfig:
        """A (Gaussian) and B = 0 at init, so the adapted model starts equal to the base model."""
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets,
                          rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})


@dataclass
class DoRA(LoRA):
    """W' = m * (W + s B A) / ||W + s B A|| per output row (PEFT `use_dora`): a magnitude m [out] beside LoRA."""

    magnitude: torch.Tensor = field(default=None)

    name: ClassVar[str] = "dora"
    peft_keys: ClassVar[tuple] = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")
    kohya_keys: ClassVar[tuple] = ("lora_down.weight", "lora_up.weight", "dora_scale")

    def delta(self, base: torch.Tensor | None = None, strength: float = 1.0) -> torch.Tensor:
        # At strength 0 the adapter is off (not m * W / ||W||, which differs from W): the slider deactivates it.
        if base is None:
            raise ValueError("a DoRA layer's delta depends on the base weight")
        if strength == 0:
            return torch.zeros(self.shape, dtype=torch.float64)
        weight = base.double() + strength * self.update()
        norm = weight.norm(dim=1, keepdim=True)
        return self.magnitude.double().unsqueeze(1) / norm * weight - base.double()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), "lora_magnitude_vector": self.magnitude}

    @classmethod
    def from_tensors(cls, parts: dict, alpha: float, rank: int | None = None) -> "DoRA":
        return cls(parts["lora_A.weight"].float(), parts["lora_B.weight"].float(), float(alpha),
                   parts["lora_magnitude_vector"].float())

    def check(self, out_features: int, in_features: int) -> None:
        super().check(out_features, in_features)
        _expect("magnitude", self.magnitude, (out_features,))

    def kohya(self, common_alpha: float) -> dict[str, torch.Tensor]:
        # Current LyCORIS writes dora_scale as (out, 1): the magnitude of each output row (wd_on_out).
        return {**super().kohya(common_alpha), "dora_scale": self.magnitude.reshape(-1, 1)}

    @classmethod
    def from_kohya(cls, parts: dict, out_features: int, in_features: int) -> "DoRA":
        lora = LoRA.from_kohya(parts, out_features, in_features)
        scale = parts["dora_scale"]
        if tuple(scale.shape) == (1, in_features) and scale.numel() > 1:
            raise ShapeError(f"dora_scale has shape {tuple(scale.shape)}: a magnitude per input column (older LyCORIS "
                             "files), which PEFT's DoRA (one per output row) cannot hold")
        _expect("dora_scale", scale, (out_features, 1))
        return cls(lora.down, lora.up, lora.alpha, scale.reshape(-1).float())

    @staticmethod
    def config(rank: int, alpha: float, targets: list[str], rank_pattern=None, alpha_pattern=None) -> LoraConfig:
        """B = 0 and m = ||W|| at init: the adapted model starts equal to the base model."""
        return LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets, use_dora=True,
                          rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {})


@dataclass
class LoHa:
    """delta W = (alpha / r) (W1a W1b) * (W2a W2b), a Hadamard product of two rank-r products (rank up to r^2)."""

    w1a: torch.Tensor  # [out, r]
    w1b: torch.Tensor  # [r, in]
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float

    name: ClassVar[str] = "loha"
    peft_keys: ClassVar[tuple] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    kohya_keys: ClassVar[tuple] = peft_keys

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1a.shape[0], self.w1b.shape[1]

    def update(self) -> torch.Tensor:
        return self.scale * (self.w1a.double() @ self.w1b.double()) * (self.w2a.double() @ self.w2b.double())

    def delta(self, base=None, strength: float = 1.0) -> torch.Tensor:
        return strength * self.update()

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.peft_keys, (self.w1a, self.w1b, self.w2a, self.w2b)))

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @classmethod
    def from_tensors(cls, parts: dict, alpha: float, rank: int | None = None) -> "LoHa":
        return cls(*(parts[k].float() for k in cls.peft_keys), float(alpha))

    @classmethod
    def missing(cls, parts: dict) -> str | None:
        return next((key for key in cls.peft_keys if key not in parts), None)

    @staticmethod
    def rank_of(parts: dict) -> int:
        return parts["hada_w1_b"].shape[0]

    def check(self, out_features: int, in_features: int) -> None:
        r = self.rank
        for key, tensor, shape in zip(self.peft_keys, self.tensors().values(),
                                      ((out_features, r), (r, in_features), (out_features, r), (r, in_features))):
            _expect(key, tensor, shape)

    # ComfyUI loha.py: scale = alpha / hada_w1_b.shape[0], the same as PEFT's alpha / r: keys map one to one.
    def kohya(self, common_alpha: float) -> dict[str, torch.Tensor]:
        return {**self.tensors(), "alpha": torch.tensor(float(self.alpha))}

    @classmethod
    def from_kohya(cls, parts: dict, out_features: int, in_features: int) -> "LoHa":
        if "hada_t1" in parts or "hada_t2" in parts:
            raise ShapeError("hada_t1/hada_t2 are convolution (Tucker) parts; the adapted layers here are linear")
        layer = cls(*(parts[k].float() for k in cls.peft_keys), _alpha(parts, parts["hada_w1_b"].shape[0]))
        layer.check(out_features, in_features)
        return layer

    @staticmethod
    def config(rank: int, alpha: float, targets: list[str], rank_pattern=None, alpha_pattern=None) -> LoHaConfig:
        """PEFT's init: W2b = 0, so the adapted model starts equal to the base model."""
        return LoHaConfig(r=rank, alpha=alpha, target_modules=targets, rank_pattern=rank_pattern or {},
                          alpha_pattern=alpha_pattern or {})


@dataclass
class LoKr:
    """delta W = (alpha / r) kron(W1, W2), W1 [out_l, in_m] full, W2 [out_k, in_n] full or W2a W2b of rank r.

    Out and in are split as LyCORIS/PEFT's `factorization(dim, -1)` does (near-square). PEFT keeps W2 full when
    r >= max(out_k, in_n) / 2, so then the rank only sets the scale alpha / r.
    """

    parts: dict  # PEFT names: lokr_w1 and lokr_w2, or lokr_w2_a / lokr_w2_b
    alpha: float
    rank: int

    name: ClassVar[str] = "lokr"
    peft_keys: ClassVar[tuple] = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    kohya_keys: ClassVar[tuple] = peft_keys

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.parts
        w1 = p["lokr_w1"].double() if "lokr_w1" in p else p["lokr_w1_a"].double() @ p["lokr_w1_b"].double()
        w2 = p["lokr_w2"].double() if "lokr_w2" in p else p["lokr_w2_a"].double() @ p["lokr_w2_b"].double()
        return w1, w2

    @property
    def shape(self) -> tuple[int, int]:
        w1, w2 = self.factors()
        return w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]

    def update(self) -> torch.Tensor:
        return self.scale * torch.kron(*self.factors())

    def delta(self, base=None, strength: float = 1.0) -> torch.Tensor:
        return strength * self.update()

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.parts)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.parts.values())

    @classmethod
    def from_tensors(cls, parts: dict, alpha: float, rank: int | None = None) -> "LoKr":
        parts = {k: v.float() for k, v in parts.items() if k in cls.peft_keys}
        if rank is None:  # not in the metadata: what PEFT would have had to be given for these shapes
            rank = parts["lokr_w2_a"].shape[1] if "lokr_w2_a" in parts else max(parts["lokr_w2"].shape)
        return cls(parts, float(alpha), int(rank))

    @classmethod
    def missing(cls, parts: dict) -> str | None:
        for full, pair in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b"))):
            if full not in parts and not all(key in parts for key in pair):
                return f"{full} (or {pair[0]}/{pair[1]})"
        return None

    @staticmethod
    def split(out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return factorization(out_features, -1), factorization(in_features, -1)

    def check(self, out_features: int, in_features: int) -> None:
        (out_l, out_k), (in_m, in_n) = self.split(out_features, in_features)
        w1, w2 = self.factors()
        _expect("lokr_w1", w1, (out_l, in_m))
        _expect("lokr_w2", w2, (out_k, in_n))

    # ComfyUI lokr.py: alpha / dim applies only when a factor is decomposed (dim = that factor's rank); with both
    # factors full the scale is 1 (LyCORIS then forces alpha = dim). So a full pair carries PEFT's scale in lokr_w1.
    def kohya(self, common_alpha: float) -> dict[str, torch.Tensor]:
        if "lokr_w2_a" in self.parts or "lokr_w1_a" in self.parts:
            return {**self.parts, "alpha": torch.tensor(float(self.alpha))}
        return {"lokr_w1": self.parts["lokr_w1"] * self.scale, "lokr_w2": self.parts["lokr_w2"],
                "alpha": torch.tensor(float(self.rank))}

    @classmethod
    def from_kohya(cls, parts: dict, out_features: int, in_features: int) -> "LoKr":
        """Bring any LyCORIS layout to one PEFT can hold: W1 full, W2 decomposed only at a rank PEFT decomposes."""
        if "lokr_t2" in parts:
            raise ShapeError("lokr_t2 is a convolution (Tucker) part; the adapted layers here are linear")
        for a, b in (("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b")):
            if (a in parts) != (b in parts):
                raise ShapeError(f"{a} and {b} must come together")
        if not ("lokr_w1" in parts or "lokr_w1_a" in parts) or not ("lokr_w2" in parts or "lokr_w2_a" in parts):
            raise ShapeError("a LoKr layer needs lokr_w1 (or lokr_w1_a/_b) and lokr_w2 (or lokr_w2_a/_b)")
        dim = parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else parts["lokr_w1_b"].shape[0] if "lokr_w1_b" in parts else None
        file_scale = float(parts["alpha"].item()) / dim if dim is not None and "alpha" in parts else 1.0
        probe = cls({k: v.float() for k, v in parts.items() if k in cls.peft_keys}, 1.0, 1)
        probe.check(out_features, in_features)
        w1, w2 = probe.factors()
        (_, out_k), (_, in_n) = cls.split(out_features, in_features)
        if "lokr_w2_a" in parts and parts["lokr_w2_a"].shape[1] < max(out_k, in_n) / 2:
            rank = parts["lokr_w2_a"].shape[1]
            new = {"lokr_w1": w1.float(), "lokr_w2_a": parts["lokr_w2_a"].float(), "lokr_w2_b": parts["lokr_w2_b"].float()}
        else:
            rank = max(out_k, in_n)  # PEFT keeps W2 full from rank max/2 up
            new = {"lokr_w1": w1.float(), "lokr_w2": w2.float()}
        if not file_scale > 0:
            raise ShapeError(f"alpha gives scale {file_scale}; it must be positive")
        return cls(new, file_scale * rank, rank)

    @staticmethod
    def config(rank: int, alpha: float, targets: list[str], rank_pattern=None, alpha_pattern=None) -> LoKrConfig:
        """PEFT's init: W1 = 0, so the adapted model starts equal to the base model."""
        return LoKrConfig(r=rank, alpha=alpha, target_modules=targets, rank_pattern=rank_pattern or {},
                          alpha_pattern=alpha_pattern or {})


def _alpha(parts: dict, rank: int) -> float:
    # No alpha key: alpha = rank, scale 1 (kohya's and ComfyUI's default).
    return float(parts["alpha"].item()) if "alpha" in parts else float(rank)


ADAPTER_TYPES: dict[str, type] = {cls.name: cls for cls in (LoRA, DoRA, LoHa, LoKr)}
# PEFT parameter names -> type, longest first so `lora_magnitude_vector` marks DoRA before lora_A marks LoRA
_PEFT_SUFFIXES = sorted({key for cls in ADAPTER_TYPES.values() for key in cls.peft_keys}, key=len, reverse=True)
# parameter-name parts of every type's weights in a model (qrlora, vera_lambda: research_types.py)
TRAINABLE_MARKERS = ("lora_", "hada_", "lokr_", "qrlora", "vera_lambda")


def adapter_type(name: str) -> type:
    try:
        return ADAPTER_TYPES[name]
    except KeyError:
        raise UserError(f"--adapter-type {name!r}: choose one of {', '.join(ADAPTER_TYPES)}.") from None


def split_peft_key(key: str) -> tuple[str, str] | None:
    """`<layer>.<PEFT parameter name>` -> (layer, name); None when the key is no adapter weight."""
    for suffix in _PEFT_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def type_of_peft_parts(parts: dict) -> type:
    if "lora_magnitude_vector" in parts:
        return DoRA
    if "lora_A.weight" in parts:
        return LoRA
    if any(k.startswith("hada_") for k in parts):
        return LoHa
    return LoKr


def type_of_kohya_parts(parts: dict) -> type | None:
    if "lora_down.weight" in parts or "lora_up.weight" in parts:
        return DoRA if "dora_scale" in parts else LoRA
    if any(k.startswith("hada_") for k in parts):
        return LoHa
    if any(k.startswith("lokr_") for k in parts):
        return LoKr
    return None


KOHYA_SUFFIXES = {"alpha", "dora_scale", "hada_t1", "hada_t2", "lokr_t2",
                  *(key for cls in ADAPTER_TYPES.values() for key in cls.kohya_keys)}
