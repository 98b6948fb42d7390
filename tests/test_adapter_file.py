"""The adapter file: what the writer writes, the reader reads back unchanged; the library stores it all or nothing."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from dreambooth_lora.adapter_file import (
    DIFFUSERS_META_KEY,
    STUDIO_META_KEY,
    AdapterFile,
    LayerFactors,
    read_adapter,
    store_adapter,
    write_adapter,
)
from dreambooth_lora.errors import UserError
from dreambooth_lora.library import Library


def sample_adapter() -> AdapterFile:
    """Per-layer ranks and alphas that differ, a text-encoder layer and an identifier row: every part of the file."""
    generator = torch.Generator().manual_seed(0)
    layers = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LayerFactors(
            torch.randn(4, 16, generator=generator), torch.randn(16, 4, generator=generator), 8.0),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": LayerFactors(
            torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator), 2.0),
        "text_encoder.encoder.layers.0.self_attn.q_proj": LayerFactors(
            torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator), 4.0),
    }
    identifiers = {"sks": torch.randn(1, 32, generator=generator)}
    meta = {"name": "a", "token": "sks", "class_noun": "dog", "steps": 10, "nested": {"list": [1, 2.5, "x"]}}
    return AdapterFile(layers, identifiers, meta)


def test_written_file_reads_back_identical(tmp_path):
    adapter = sample_adapter()
    write_adapter(tmp_path / "adapter.safetensors", adapter)
    back = read_adapter(tmp_path / "adapter.safetensors")
    assert back.meta == adapter.meta
    assert back.tensors.keys() == adapter.tensors.keys()
    assert all(torch.equal(back.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    assert {k: layer.alpha for k, layer in back.layers.items()} == {k: layer.alpha for k, layer in adapter.layers.items()}
    assert back.identifiers.keys() == {"sks"} and back.max_rank == 4
    # and writing what was read gives the same file: nothing is lost on a round trip. (Not byte for byte:
    # safetensors writes its header's metadata map in an order that varies between writes.)
    write_adapter(tmp_path / "again.safetensors", back)
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as first, safe_open(str(tmp_path / "again.safetensors"), "pt") as again:
        assert first.metadata() == again.metadata()
        assert first.keys() == again.keys() and all(torch.equal(first.get_tensor(k), again.get_tensor(k)) for k in first.keys())


def test_header_carries_diffusers_rank_and_alpha_patterns(tmp_path):
    write_adapter(tmp_path / "adapter.safetensors", sample_adapter())
    with safe_open(str(tmp_path / "adapter.safetensors"), "pt") as handle:
        header = handle.metadata()
    config = json.loads(header[DIFFUSERS_META_KEY])
    assert config["unet.r"] in (2, 4) and config["text_encoder.lora_alpha"] == 4.0
    assert len(config["unet.rank_pattern"]) == 1 and len(config["unet.alpha_pattern"]) == 1
    assert json.loads(header[STUDIO_META_KEY])["token"] == "sks"


def test_store_adapter_writes_file_meta_and_samples(tmp_path):
    library = Library(tmp_path / "data")
    samples = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(2)]
    entry = store_adapter(library, sample_adapter(), samples)
    assert entry.name == "a" and entry.rank == 4 and len(entry.samples) == 2
    assert json.loads((entry.folder / "meta.json").read_text())["id"] == entry.id == read_adapter(entry.file).meta["id"]
    assert not list((tmp_path / "data" / "adapters").glob(".staging-*"))
    with pytest.raises(UserError, match="already exists"):
        store_adapter(library, sample_adapter())
    assert not list((tmp_path / "data" / "adapters").glob(".staging-*"))  # a refused store leaves nothing behind


def test_name_helpers(tmp_path):
    library = Library(tmp_path / "data")
    store_adapter(library, sample_adapter())
    assert library.free_name("a") == "a-2" and library.free_name("b") == "b"
    assert library.check_new_name("b") == "b"
    with pytest.raises(UserError, match="'a' already exists; choose another --name"):
        library.check_new_name("a")
    with pytest.raises(UserError, match="Invalid adapter name"):
        library.check_new_name("../x")
