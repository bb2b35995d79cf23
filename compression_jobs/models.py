"""Reading and writing the models the jobs take and produce.

A job's model is a path: a sentence-transformers directory (``modules.json``), a Hugging Face
directory (``config.json``), a Cohort artifact (``manifest.json``, recipe applied on load), or a
saved torch module (``torch.save(module)``, a ``.pt``/``.pth`` file). Saved torch modules are
pickles: load only files you trust.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from producers.errors import CompressionError
from workers.encoder_loading import (
    MANIFEST_NAME,
    PACKAGED_ALIASES,
    apply_recipe,
    apply_structure,
    load_encoder,
    packaged_encoder_path,
    quiet_transformers,
    read_manifest,
    verify_files,
)

ST = "sentence_transformer"
HF = "hf"
TORCH = "torch"
TORCH_FILE = "model.pt"


@dataclass
class LoadedModel:
    """A model in memory with what the store needs to know about it."""

    kind: str
    """sentence_transformer | hf | torch."""
    module: Any
    """The SentenceTransformer, the transformers model, or the torch module."""
    path: str
    """Where it was read from."""
    manifest: dict[str, Any] | None = None
    """The manifest, when it was read from an artifact."""
    recipe: dict[str, Any] | None = None
    """The load-time recipe already applied (None: plain float weights)."""
    structure: dict[str, Any] | None = None
    """Shrunk heads / FFN widths that the saved config cannot express (see ``apply_structure``)."""
    notes: list[str] = field(default_factory=list)

    @property
    def body(self) -> torch.nn.Module:
        """The network the methods work on: the transformer of an encoder, else the module."""
        return self.module[0].model if self.kind == ST else self.module

    @body.setter
    def body(self, value: torch.nn.Module) -> None:
        if self.kind == ST:
            # sentence-transformers 6: ``auto_model`` is read-only; ``model`` is the attribute.
            self.module[0].model = value
        else:
            self.module = value

    def clone(self) -> LoadedModel:
        """A deep copy, so a method can change it and keep the parent for comparison."""
        return LoadedModel(self.kind, copy.deepcopy(self.module), self.path, self.manifest,
                           None if self.recipe is None else dict(self.recipe),
                           copy.deepcopy(self.structure), list(self.notes))


def resolve_path(spec: str) -> Path:
    """The directory or file a model spec names (the packaged encoder's name included)."""
    return packaged_encoder_path() if spec in PACKAGED_ALIASES else Path(spec).expanduser()


def load_model(spec: str, *, verify: bool = True) -> LoadedModel:
    """Load a model by path (or the packaged encoder's name).

    Raises:
        CompressionError: missing path, corrupt or unreadable file, or not a model.
    """
    path = resolve_path(spec)
    if not path.exists():
        raise CompressionError(f"model path does not exist: {spec}", path=spec)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _load_artifact(path, verify=verify)
        if (path / "modules.json").is_file():
            return LoadedModel(ST, load_encoder(str(path)), str(path))
        if (path / "config.json").is_file():
            return LoadedModel(HF, _load_hf(path), str(path))
        raise CompressionError(f"{spec} is not a model directory: expected modules.json "
                               "(sentence-transformers), config.json (Hugging Face) or "
                               f"{MANIFEST_NAME} (Cohort artifact)", path=spec)
    return LoadedModel(TORCH, _load_torch(path), str(path))


def _load_hf(path: Path, structure: dict[str, Any] | None = None) -> torch.nn.Module:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path))
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls: Any = getattr(transformers, arch, None) if arch else None
        cls = cls if isinstance(cls, type) else transformers.AutoModel
        kwargs = {"ignore_mismatched_sizes": True} if structure else {}
        with warnings.catch_warnings(), quiet_transformers():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(path), **kwargs)
        if structure:
            from workers.encoder_loading import _load_weights

            apply_structure(_bert_like_root(model), structure)
            _load_weights(_bert_like_root(model), path)
    except CompressionError:
        raise
    except Exception as exc:
        raise CompressionError(f"cannot load Hugging Face model from {path}: {type(exc).__name__}: {exc}",
                               path=str(path)) from None
    return model.eval()


def _bert_like_root(model: torch.nn.Module) -> torch.nn.Module:
    # Task models wrap the encoder (``model.bert``); structure names are relative to it.
    return getattr(model, "base_model", model)


def _load_torch(path: Path) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CompressionError(f"cannot read {path} as a saved torch module: {type(exc).__name__}: {exc}",
                               path=str(path)) from None
    if not isinstance(module, torch.nn.Module):
        raise CompressionError(f"{path} holds a {type(module).__name__}, not a torch module "
                               "(save the module itself with torch.save(module, path))", path=str(path))
    return module.eval()


def _load_artifact(path: Path, *, verify: bool) -> LoadedModel:
    manifest = read_manifest(path)
    info = manifest.get("model")
    if not info:
        raise CompressionError(f"artifact {path} holds a report, not a model", path=str(path))
    if verify:
        verify_files(path, manifest)
    inner = path / info.get("path", "model")
    kind, structure, recipe = info.get("kind"), info.get("structure"), manifest.get("recipe")
    module: Any
    if kind == ST:
        module = load_encoder(str(path), verify=False)
        return LoadedModel(ST, module, str(path), manifest, recipe, structure)
    if kind == HF:
        module = _load_hf(inner, structure)
    elif kind == TORCH:
        module = _load_torch(inner / TORCH_FILE)
    else:
        raise CompressionError(f"artifact {path} has an unknown model kind {kind!r}", path=str(path))
    if recipe:
        module = apply_recipe(module, recipe, artifact=path)
    return LoadedModel(kind, module, str(path), manifest, recipe, structure)


def save_model(model: LoadedModel, dest: Path) -> None:
    """Write the model's float weights into ``dest`` in its own format."""
    if model.recipe:
        raise CompressionError("a model with a load-time recipe applied cannot be saved again; "
                               "compress its parent instead")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if model.kind == ST:
            model.module.save(str(dest))
        elif model.kind == HF:
            model.module.save_pretrained(str(dest))
        else:
            torch.save(model.module, str(dest / TORCH_FILE))
    except Exception as exc:
        raise CompressionError(f"cannot save the model: {type(exc).__name__}: {exc}") from None


def parameter_count(module: torch.nn.Module) -> int:
    """Parameters and packed int8 weights of a module."""
    count = sum(p.numel() for p in module.parameters())
    m: Any
    for m in module.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(m, "weight"):
            weight = m.weight() if callable(m.weight) else m.weight
            count += weight.numel() + (m.bias().numel() if callable(getattr(m, "bias", None))
                                       and m.bias() is not None else 0)
    return count


def model_size_bytes(path: str | Path) -> int:
    """Bytes on disk of a model file or directory."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
