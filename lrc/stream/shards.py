"""A model whose blocks live in its safetensors shards: a skeleton on the meta device, one block materialized at a time.

`load_streamed(spec)` builds the model's structure on the meta device from config.json (no memory for
weights), fills the parts outside the block stack (embeddings, final norm, head; tied weights once) from
the shards and computes its non-persistent buffers (rotary frequencies, position ids) as transformers does
on load. Block i's parameters stay on the meta device until `StreamedBlocks.load(i)` reads them from the
shards (positioned reads, no mapping); `release(i)` puts them back on the meta device. The layer walker does both in
`placed(i)` (see `streamed_blocks`), so every pass that walks the blocks works unchanged with either model.
Loaded tensors are cast to the dtype `load_model` gives the model (the config's, else float32): the same
values as the in-memory model's, tested tensor by tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import ExitStack
from io import BufferedReader
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ModelLoadError
from ..io.checkpoint import SAFETENSORS_DTYPES, read_header, read_tensor, renaming_on_load
from ..model.experts import is_fused_experts
from ..progress import Progress, no_progress
from ..sources import LoadedModel

_STREAMED: weakref.WeakKeyDictionary[nn.Module, StreamedBlocks] = weakref.WeakKeyDictionary()


def streamed_blocks(model: nn.Module) -> StreamedBlocks | None:
    """The block source of a model from `load_streamed`, None for an ordinary (resident) model."""
    return _STREAMED.get(model)


class StreamedBlocks:
    """Reads tensors of `model` by name from the safetensors files of `folder`.

    Each tensor is read with one positioned read into fresh memory (no memory mapping: pages of the files
    never count in the process's resident memory, nor against its RLIMIT_DATA).
    """

    def __init__(self, model: nn.Module, folder: Path, stack_name: str, layers: nn.ModuleList) -> None:
        self.model = model
        self.stack_name = stack_name
        self.layers = layers
        self._files = ExitStack()
        self._where: dict[str, tuple[BufferedReader, int, dict[str, Any]]] = {}
        rename = renaming_on_load(model, convert=False)  # GPT-NeoX's embed_out is the model's lm_head
        # a base model (BertModel) read from a checkpoint with a task head names its tensors "bert.*": stripped,
        # as transformers' from_pretrained strips them
        prefix = getattr(model, "base_model_prefix", "")
        prefix = f"{prefix}." if prefix and not hasattr(model, prefix) else ""
        for path in sorted(folder.glob("*.safetensors")):
            start, header = read_header(path)
            handle = self._files.enter_context(path.open("rb"))
            for name, entry in header.items():
                if entry["dtype"] not in SAFETENSORS_DTYPES:
                    raise ModelLoadError(f"tensor {name} in {path} has dtype {entry['dtype']}, which streaming cannot "
                                         "read: compress without --stream")
                key = rename(name)[0]
                self._where[key.removeprefix(prefix) if prefix else key] = (handle, start, entry)
        self.loads = 0  # block loads so far (a resumed run does fewer)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Tensor `name` from the shards, with the dtype of `like` (the skeleton's entry)."""
        if name not in self._where:
            raise ModelLoadError(f"the checkpoint has no tensor {name}, which the model's structure needs")
        handle, start, entry = self._where[name]
        if list(entry["shape"]) != list(like.shape):
            raise ModelLoadError(f"tensor {name} has shape {entry['shape']} in the checkpoint, the model expects "
                                 f"{list(like.shape)}")
        try:
            return read_tensor(handle, start, entry).to(like.dtype)
        except ValueError:
            raise ModelLoadError(f"tensor {name}: the safetensors file ends early (truncated?)") from None

    def load(self, index: int) -> nn.Module:
        """Block `index` with its weights read from the shards."""
        layer = self.layers[index]
        _fill(layer, f"{self.stack_name}.{index}.", self)
        self.loads += 1
        return layer

    def release(self, index: int) -> None:
        """Block `index`'s weights back on the meta device (their memory is freed)."""
        _to_meta(self.layers[index])

    def close(self) -> None:
        self._files.close()


def load_streamed(spec: str, progress: Progress = no_progress) -> LoadedModel:
    """The model of `spec` as a skeleton whose blocks are read when walked (see the module docstring)."""
    import transformers
    from transformers import AutoTokenizer

    from ..io import hf_integration
    from ..io.checkpoint import read_tensor_names
    from ..load_check import one_line
    from ..model.adapters import adapter_for
    from ..model.targets import check_not_compressed, warn_left_out_heads
    from ..sources import check_folder, local_folder, resolve_model

    hf_integration.register()
    source = resolve_model(spec)
    folder = local_folder(source, progress)  # a .gguf is converted once into a safetensors folder: stream that
    check_folder(folder)
    config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    check_not_compressed(spec, config)
    tensor_names = read_tensor_names(folder)
    warn_left_out_heads(spec, config, tensor_names)
    adapter = adapter_for(config)
    dtype = _model_dtype(config, folder)
    try:
        with torch.device("meta"):
            model = getattr(transformers, adapter.auto_class).from_config(
                config, dtype=dtype, **adapter.build_flags(tensor_names))
    except Exception as exc:
        raise ModelLoadError(f"transformers cannot build {folder}: {one_line(exc)}") from None
    if adapter.experts is not None and any(is_fused_experts(m) for m in model.modules()):  # not a model dense in every block
        raise ConfigError(f"streaming does not support mixture-of-experts models ({config.model_type}): "
                          "compress it without --stream")
    model.eval()
    model.requires_grad_(False)
    stack_name, layers = adapter.layer_stack(model)
    _init_non_persistent_buffers(model)
    blocks = StreamedBlocks(model, folder, stack_name, layers)
    _fill(model, "", blocks, skip=f"{stack_name}.")
    _check_covered(model, blocks, stack_name)
    _STREAMED[model] = blocks
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {folder}: {one_line(exc)}") from None
    return LoadedModel(model, tokenizer, source, folder)


def _model_dtype(config: Any, folder: Path) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` gives: config.json's, else the first floating tensor's."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(name, torch.dtype):
        return name
    if isinstance(name, str):
        return getattr(torch, name)
    from ..io.checkpoint import read_tensor_names

    for dtype, _ in read_tensor_names(folder).values():
        if dtype in SAFETENSORS_DTYPES and SAFETENSORS_DTYPES[dtype].is_floating_point:
            return SAFETENSORS_DTYPES[dtype]
    return torch.float32


def _entries(module: nn.Module, prefix: str, skip: str | None = None) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """(full name, owning module, attribute, tensor) of every parameter and persistent buffer (a tied one under
    each of its names); modules under `skip` are left out."""
    for mod_name, mod in module.named_modules():
        full = f"{prefix}{mod_name}." if mod_name else prefix
        if skip is not None and full.startswith(skip):
            continue
        for attr, tensor in list(mod._parameters.items()) + [
            (a, b) for a, b in mod._buffers.items() if a not in mod._non_persistent_buffers_set
        ]:
            if tensor is None:
                continue
            yield f"{full}{attr}", mod, attr, tensor


def _fill(module: nn.Module, prefix: str, blocks: StreamedBlocks, skip: str | None = None) -> None:
    """Every meta parameter / persistent buffer of `module` read from the shards; a tied tensor (one object
    under several names) is read once, under whichever of its names the checkpoint stores, and stays tied."""
    entries = list(_entries(module, prefix, skip))
    values: dict[int, torch.Tensor] = {}
    for name, _, _, tensor in entries:
        if tensor.is_meta and id(tensor) not in values and name in blocks:
            value = blocks.tensor(name, tensor)
            values[id(tensor)] = nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value
    for _, mod, attr, tensor in entries:
        new = values.get(id(tensor))
        if isinstance(new, nn.Parameter):
            mod._parameters[attr] = new
        elif new is not None:
            mod._buffers[attr] = new


def _to_meta(module: nn.Module) -> None:
    for mod in module.modules():
        for attr, p in mod._parameters.items():
            if p is not None and not p.is_meta:
                mod._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set and not b.is_meta:
                mod._buffers[attr] = torch.empty_like(b, device="meta")


def _init_non_persistent_buffers(model: Any) -> None:
    """Rotary frequencies, position ids, ...: not in the checkpoint; computed by the model's own _init_weights,
    as transformers' from_pretrained does after building on the meta device."""
    owners: dict[str, nn.Module] = {}
    for name, buffer in model.named_non_persistent_buffers():
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        mod._buffers[attr] = torch.empty_like(buffer, device="cpu")
        owners[mod_name] = mod
    for mod in owners.values():
        model._init_weights(mod)


def _check_covered(model: nn.Module, blocks: StreamedBlocks, stack_name: str) -> None:
    """Every tensor outside the blocks is filled, and every block tensor exists in the checkpoint."""
    for name, _, _, tensor in _entries(model, "", skip=f"{stack_name}."):
        if tensor.is_meta:
            raise ModelLoadError(f"the checkpoint has no tensor {name}, which the model's structure needs")
    fused = [n for n, m in model.named_modules() if n and is_fused_experts(m)]
    for name, _, _, _ in _entries(model, ""):
        if name.startswith(f"{stack_name}.") and name not in blocks:
            if any(name.startswith(f"{expert}.") for expert in fused):  # stored one matrix per expert
                raise ConfigError(f"streaming cannot read the experts of this mixture-of-experts model ({name} is "
                                  "stored one matrix per expert, which transformers merges when it loads the whole "
                                  "model): compress it without --stream")
            raise ModelLoadError(f"the checkpoint has no tensor {name}, which the model's structure needs")
