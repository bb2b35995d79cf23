"""Versioned, frozen configs of the compression jobs; pure Python (no torch).

Each job method has one config class. A config is validated when it is created (a bad value
raises ``CompressionError`` naming the field) and round-trips through JSON::

    cfg = QuantizeConfig(kind="dynamic_int8", keep_float=("encoder.layer.0.output.dense",))
    assert QuantizeConfig.from_json(cfg.to_json()) == cfg
    config_from_json({"method": "quantize", "version": 1, "kind": "fp16"})

The code that applies a config is registered against its type (``compression_jobs.registry``).

Data sources (``sources``, ``calibration``, ``sentences``) are dataset names of the shared data
folder (see ``compression_jobs.data.DATASETS``) or paths of files (``.txt``, ``.jsonl``, ``.csv``,
``.npy``, ``.npz``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from producers.errors import CompressionError

CONFIG_VERSION = 1
"""The config schema version this code reads and writes."""

DATASET_NAMES = frozenset(
    {"banking77", "paws_wiki", "stsb_train", "stsb_dev", "self_instruct", "arena_hard", "mt_bench"}
)
"""Names of the shared data sets a config may use as a source."""

EVAL_ONLY_DATASETS = frozenset({"stsb_dev"})
"""Evaluation data: never trained or calibrated on."""

QUANTIZE_KINDS = ("dynamic_int8", "static_int8", "fp16", "bf16")
PRUNE_KINDS = ("l1_unstructured", "global_l1_unstructured", "heads", "ffn")
DISTILL_KINDS = ("embedding", "classifier")
ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")
LAYER_SELECTIONS = ("first", "uniform")
DEVICES = ("auto", "cpu", "cuda")

C = TypeVar("C", bound="JobConfig")


def _fail(cls_name: str, name: str, problem: str) -> CompressionError:
    return CompressionError(f"{cls_name}.{name} {problem}", field=name, config=cls_name)


@dataclass(frozen=True)
class JobConfig:
    """Base of every job config: a version, validation on creation, JSON round-trip."""

    method: ClassVar[str] = ""
    _tuple_fields: ClassVar[tuple[str, ...]] = ()

    version: int = CONFIG_VERSION
    """Schema version of this config (only 1 exists)."""

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise self._error("version", f"must be an integer, got {self.version!r}")
        if self.version != CONFIG_VERSION:
            raise self._error("version", f"must be {CONFIG_VERSION}, got {self.version}")
        for name in self._tuple_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, list):
                # Frozen: replace the list by a tuple so that configs hash and compare by value.
                object.__setattr__(self, name, tuple(value))
            elif not isinstance(value, tuple):
                raise self._error(name, f"must be a list, got {type(value).__name__}")
        self._validate()

    def _validate(self) -> None:
        """Check the method's fields; overridden by each config."""

    def _error(self, name: str, problem: str) -> CompressionError:
        return _fail(type(self).__name__, name, problem)

    # --- checks shared by the configs ---------------------------------------------------
    def _choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise self._error(name, f"must be one of {', '.join(choices)}; got {value!r}")

    def _bool(self, name: str) -> None:
        if not isinstance(getattr(self, name), bool):
            raise self._error(name, f"must be true or false, got {getattr(self, name)!r}")

    def _int(self, name: str, *, minimum: int | None = None, maximum: int | None = None) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._error(name, f"must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self._error(name, f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self._error(name, f"must be at most {maximum}, got {value}")

    def _float(self, name: str, *, low: float, high: float, low_open: bool = False,
               high_open: bool = False) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._error(name, f"must be a number, got {value!r}")
        if isinstance(value, int):
            object.__setattr__(self, name, float(value))
            value = float(value)
        if not math.isfinite(value):
            raise self._error(name, f"must be finite, got {value}")
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise self._error(name, f"must be in {lo}{low}, {high}{hi}, got {value}")

    def _strings(self, name: str, *, allow_empty: bool = True) -> None:
        value = getattr(self, name)
        if value is None:
            return
        if not allow_empty and not value:
            raise self._error(name, "must not be empty")
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise self._error(name, f"must hold non-empty strings, got {item!r}")

    def _sources(self, name: str, *, training: bool) -> None:
        self._strings(name)
        for item in getattr(self, name):
            if item in DATASET_NAMES:
                if training and item in EVAL_ONLY_DATASETS:
                    raise self._error(name, f"must not use {item!r}: it is evaluation data")
            elif "/" not in item and "." not in item:
                raise self._error(
                    name, f"holds {item!r}, which is neither a data set ({', '.join(sorted(DATASET_NAMES))})"
                    " nor a file path")

    # --- JSON -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict with the method name: the form tasks and manifests carry."""
        data: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json_str(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls: type[C], data: Mapping[str, Any] | str | bytes) -> C:
        """Build and validate a config from its JSON form (a dict or a JSON string).

        Raises:
            CompressionError: the JSON is invalid, names another method, has an unknown key,
                or a value fails validation.
        """
        if isinstance(data, str | bytes):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise CompressionError(f"{cls.__name__}: config is not valid JSON: {exc}") from None
        if not isinstance(data, Mapping):
            raise CompressionError(f"{cls.__name__}: config must be a JSON object, got {type(data).__name__}")
        values = dict(data)
        method = values.pop("method", cls.method)
        if method != cls.method:
            raise _fail(cls.__name__, "method", f"must be {cls.method!r}, got {method!r}")
        if "version" not in values:
            raise _fail(cls.__name__, "version", "is missing (configs are versioned)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise _fail(cls.__name__, unknown[0], f"is not a field of {cls.__name__} "
                        f"(known: {', '.join(sorted(known))})")
        return cls(**values)


@dataclass(frozen=True)
class QuantizeConfig(JobConfig):
    """Quantize the Linear layers of a model, or cast it to a half-precision type.

    The default is the recipe the encoder benchmark supports: dynamic int8 with per-channel
    weights, full-range activations where the CPU's int8 dot product cannot saturate, and the
    first FFN output layer of a BERT-like model kept in float.
    """

    method: ClassVar[str] = "quantize"
    _tuple_fields: ClassVar[tuple[str, ...]] = ("keep_float", "calibration")

    kind: str = "dynamic_int8"
    """dynamic_int8 | static_int8 (calibrated activations) | fp16 | bf16 (cast; meant for a GPU)."""
    keep_float: tuple[str, ...] | None = None
    """Glob patterns of Linear module names left in float; None: the model family's default."""
    per_channel: bool = True
    """int8 weights with one scale per output channel (True) or one per tensor."""
    reduce_range: bool | None = None
    """7-bit activations; None: decided on the machine that loads the model (off where VNNI exists)."""
    engine: str | None = None
    """torch quantized engine (x86, fbgemm, onednn, qnnpack); None: torch's default."""
    calibration: tuple[str, ...] = ()
    """Sources of calibration inputs (required by static_int8)."""
    calibration_limit: int = 512
    """Most calibration inputs used."""
    check_limit: int = 64
    """Inputs used to report the quantized model's agreement with its parent (0: skip)."""

    def _validate(self) -> None:
        self._choice("kind", QUANTIZE_KINDS)
        self._strings("keep_float")
        self._bool("per_channel")
        if self.reduce_range is not None:
            self._bool("reduce_range")
        if self.engine is not None:
            self._choice("engine", ENGINES)
        self._sources("calibration", training=True)
        self._int("calibration_limit", minimum=1, maximum=1_000_000)
        self._int("check_limit", minimum=0, maximum=100_000)
        if self.kind == "static_int8" and not self.calibration:
            raise self._error("calibration", "must name calibration data for kind static_int8")
        if self.kind in ("fp16", "bf16") and self.keep_float:
            raise self._error("keep_float", f"is not used by kind {self.kind}: casting covers every layer")


@dataclass(frozen=True)
class PruneConfig(JobConfig):
    """Prune weights (unstructured, masks made permanent) or whole heads / FFN channels."""

    method: ClassVar[str] = "prune"
    _tuple_fields: ClassVar[tuple[str, ...]] = ("include", "exclude")

    kind: str = "l1_unstructured"
    """l1_unstructured (per layer) | global_l1_unstructured | heads | ffn (structured, shrinks shapes)."""
    amount: float = 0.3
    """Fraction pruned: of each layer's weights, of all weights, of each layer's heads or FFN channels."""
    include: tuple[str, ...] = ()
    """Glob patterns of Linear module names to prune (unstructured kinds); empty: every Linear."""
    exclude: tuple[str, ...] = ()
    """Glob patterns of Linear module names never pruned (unstructured kinds)."""

    def _validate(self) -> None:
        self._choice("kind", PRUNE_KINDS)
        self._float("amount", low=0.0, high=1.0, low_open=True, high_open=True)
        self._strings("include")
        self._strings("exclude")
        if self.kind in ("heads", "ffn") and (self.include or self.exclude):
            raise self._error("include", f"and exclude apply to unstructured kinds, not {self.kind}")


@dataclass(frozen=True)
class DistillConfig(JobConfig):
    """Train a smaller student on a teacher's outputs.

    ``embedding``: the student keeps ``num_layers`` of the teacher encoder's layers (and a share
    ``ffn_fraction`` of their FFN channels) and learns to match the teacher's normalized sentence
    embeddings (MSE) on unlabeled ``sources``. The defaults are the benchmarked MiniLM student:
    layers 1, 3 and 6 of 6, half the FFN width, 3 epochs over 16,000 sentences.
    ``classifier``: a student MLP learns from the teacher's soft targets at ``temperature``
    (weight ``alpha``) and from the hard labels (weight ``1 - alpha``) of ``data`` (``.npz``
    holding ``x`` and ``y``).
    """

    method: ClassVar[str] = "distill"
    _tuple_fields: ClassVar[tuple[str, ...]] = ("sources", "student_hidden")

    kind: str = "embedding"
    """embedding (sentence encoders) | classifier."""
    epochs: int = 3
    """Passes over the training data."""
    batch_size: int = 64
    """Training batch size."""
    lr: float = 2e-4
    """AdamW learning rate (linear warm-up then linear decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    seed: int = 0
    """Seed of shuffling and initialisation."""
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""
    num_layers: int = 3
    """embedding: encoder layers the student keeps."""
    layer_selection: str = "uniform"
    """embedding: which teacher layers initialise the student: first | uniform (spread out)."""
    sources: tuple[str, ...] = ("banking77", "paws_wiki", "stsb_train", "self_instruct", "arena_hard")
    """embedding: sources of unlabeled training sentences (never stsb_dev)."""
    max_sentences: int = 16000
    """embedding: most training sentences (deduplicated, shuffled with ``seed``)."""
    max_seq_length: int = 128
    """embedding: tokens per sentence while training (the saved student keeps the teacher's limit)."""
    ffn_fraction: float = 0.5
    """embedding: share of FFN channels the student keeps (the others pruned by L1 before training)."""
    freeze_embeddings: bool = True
    """embedding: keep the token embedding table as the teacher's (faster steps, less overfitting)."""
    temperature: float = 2.0
    """classifier: softmax temperature of the soft targets."""
    alpha: float = 0.5
    """classifier: weight of the soft-target loss; 1 - alpha weighs the hard labels."""
    student_hidden: tuple[int, ...] = (64,)
    """classifier: hidden widths of the student MLP (empty: a linear student)."""
    data: str | None = None
    """classifier: ``.npz`` file with ``x`` (inputs) and ``y`` (integer labels)."""
    holdout_fraction: float = 0.2
    """classifier: share of ``data`` rows held out to report accuracy (never trained on)."""

    def _validate(self) -> None:
        self._choice("kind", DISTILL_KINDS)
        self._int("epochs", minimum=1, maximum=1000)
        self._int("batch_size", minimum=1, maximum=65536)
        self._float("lr", low=0.0, high=1.0, low_open=True)
        self._float("weight_decay", low=0.0, high=1.0)
        self._int("seed", minimum=0)
        self._choice("device", DEVICES)
        self._int("num_layers", minimum=1, maximum=1000)
        self._choice("layer_selection", LAYER_SELECTIONS)
        self._sources("sources", training=True)
        self._int("max_sentences", minimum=1)
        self._int("max_seq_length", minimum=8, maximum=8192)
        self._bool("freeze_embeddings")
        self._float("ffn_fraction", low=0.0, high=1.0, low_open=True)
        self._float("temperature", low=0.0, high=100.0, low_open=True)
        self._float("alpha", low=0.0, high=1.0)
        for width in self.student_hidden:
            if isinstance(width, bool) or not isinstance(width, int) or width < 1:
                raise self._error("student_hidden", f"must hold positive integers, got {width!r}")
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise self._error("data", f"must be a file path, got {self.data!r}")
        self._float("holdout_fraction", low=0.0, high=1.0, high_open=True)
        if self.kind == "embedding" and not self.sources:
            raise self._error("sources", "must name training sentences for kind embedding")
        if self.kind == "classifier" and self.data is None:
            raise self._error("data", "must name an .npz file (x, y) for kind classifier")


@dataclass(frozen=True)
class EvaluateConfig(JobConfig):
    """Size, parameters, latency, throughput and quality against a reference, in one report."""

    method: ClassVar[str] = "evaluate"
    _tuple_fields: ClassVar[tuple[str, ...]] = ("sentences",)

    reference: str | None = None
    """Model compared against; None: the artifact's parent (or no quality comparison)."""
    sentences: tuple[str, ...] = ("banking77",)
    """Encoders: sources of the sentences timed and compared."""
    limit: int = 1000
    """Most sentences (or data rows) used."""
    batch_size: int = 64
    """Batch size of the throughput runs."""
    repeats: int = 3
    """Timed runs per model; the report gives their median."""
    stsb: bool = True
    """Encoders: also report STS-B dev Spearman (skipped when the data is absent)."""
    data: str | None = None
    """Torch modules: ``.npz`` file with ``x`` (inputs) and optionally ``y`` (labels)."""
    threads: int | None = None
    """torch threads during timing; None: leave the process setting."""

    def _validate(self) -> None:
        if self.reference is not None and (not isinstance(self.reference, str) or not self.reference.strip()):
            raise self._error("reference", f"must be a model path, got {self.reference!r}")
        self._sources("sentences", training=False)
        self._int("limit", minimum=1, maximum=1_000_000)
        self._int("batch_size", minimum=1, maximum=65536)
        self._int("repeats", minimum=1, maximum=100)
        self._bool("stsb")
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise self._error("data", f"must be a file path, got {self.data!r}")
        if self.threads is not None:
            self._int("threads", minimum=1, maximum=1024)


CONFIG_TYPES: dict[str, type[JobConfig]] = {
    cls.method: cls for cls in (QuantizeConfig, PruneConfig, DistillConfig, EvaluateConfig)
}
"""Config class of each job method."""


def config_from_json(data: Mapping[str, Any] | str | bytes, *, method: str | None = None) -> JobConfig:
    """Build the config a JSON form names (its ``method`` key, or ``method`` when given).

    Raises:
        CompressionError: unknown method, or the config is invalid.
    """
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as exc:
            raise CompressionError(f"config is not valid JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise CompressionError(f"config must be a JSON object, got {type(data).__name__}")
    name = method or data.get("method")
    if name not in CONFIG_TYPES:
        raise CompressionError(f"unknown compression method {name!r}; known: {', '.join(sorted(CONFIG_TYPES))}",
                               field="method")
    if method is not None and data.get("method", method) != method:
        raise CompressionError(f"config is for method {data.get('method')!r}, not {method!r}", field="method")
    return CONFIG_TYPES[name].from_json(data)
