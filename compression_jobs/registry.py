"""Dispatch from a config's type to the code that applies it (torchao's ``quantize_(model, config)``).

Each method module registers its handler against its config class::

    @register(QuantizeConfig)
    def _quantize(model: LoadedModel, config: QuantizeConfig, ctx: JobContext) -> Outcome: ...

and callers use one entry point, ``apply(model, config)``. The method modules import torch, so
they are imported on the first ``apply``, never by importing this module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compression_jobs.configs import JobConfig
from producers.errors import CompressionError

Progress = Callable[[int, int, str], None]
"""``progress(step, total, stage)``: called as a job advances; may raise to cancel the job."""

_METHOD_MODULES = (
    "compression_jobs.quantize",
    "compression_jobs.prune",
    "compression_jobs.distill",
    "compression_jobs.evaluate",
)

_HANDLERS: dict[type[JobConfig], Callable[..., Any]] = {}


def _no_progress(step: int, total: int, stage: str) -> None:
    return None


@dataclass
class JobContext:
    """What a handler needs besides the model and its config."""

    progress: Progress = _no_progress
    """Progress callback (see ``Progress``)."""
    device: str = "cpu"
    """torch device the job computes on."""
    workdir: str | None = None
    """A scratch directory the job may write to (it is removed afterwards)."""


@dataclass
class Outcome:
    """What applying a config produced."""

    model: Any = None
    """The resulting ``LoadedModel``, or None for jobs that only report (evaluate)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """JSON-safe figures for the manifest and the task result."""
    recipe: dict[str, Any] | None = None
    """Steps the loader applies at load time (e.g. dynamic int8), recorded in the manifest."""
    files: dict[str, bytes] = field(default_factory=dict)
    """Extra files (relative path -> content) written next to the model."""


def register(config_type: type[JobConfig]) -> Callable[[Callable[..., Outcome]], Callable[..., Outcome]]:
    """Register the function applying configs of ``config_type``."""

    def decorator(fn: Callable[..., Outcome]) -> Callable[..., Outcome]:
        if config_type in _HANDLERS and _HANDLERS[config_type] is not fn:
            raise CompressionError(f"a handler is already registered for {config_type.__name__}")
        _HANDLERS[config_type] = fn
        return fn

    return decorator


def handler_for(config: JobConfig) -> Callable[..., Outcome]:
    """The handler registered for the config's type (or one of its bases)."""
    for name in _METHOD_MODULES:  # cached after the first call
        importlib.import_module(name)
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise CompressionError(f"no compression method is registered for {type(config).__name__}")


def apply(model: Any, config: JobConfig, ctx: JobContext | None = None) -> Outcome:
    """Apply ``config`` to ``model`` (a ``compression_jobs.models.LoadedModel``).

    Raises:
        CompressionError: the config does not fit the model, or the method failed.
    """
    return handler_for(config)(model, config, ctx or JobContext())
