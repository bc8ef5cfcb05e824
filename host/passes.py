"""The compression-pass API that plugins implement, and the registry they add to."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx

from slimfleet.agent.errors import InputError

Feed = dict[str, np.ndarray]
"""One sample: input name -> array (with the batch axis the model expects)."""


@dataclass(frozen=True)
class Option:
    """One declared option of a pass; values are checked against ``type`` and ``choices``."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def coerce(self, value: Any, owner: str) -> Any:
        """Convert a value given on the command line (a string) or in code."""
        try:
            if self.type is bool and isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(value)
                value = value.lower() in ("1", "true", "yes")
            elif self.type is list and isinstance(value, str):
                value = [v for v in value.split("+") if v]
            elif self.type is not list:
                value = self.type(value)
        except (TypeError, ValueError):
            raise InputError(
                f"pass {owner}: option {self.name}={value!r} is not a {self.type.__name__}"
            ) from None
        if self.choices is not None:
            bad = [v for v in (value if isinstance(value, list) else [value])]
            bad = [v for v in bad if v not in self.choices]
            if bad:
                choices = ", ".join(map(str, self.choices))
                raise InputError(
                    f"pass {owner}: option {self.name}={bad[0]!r} is not one of {choices}"
                )
        return value


@dataclass
class PassContext:
    """What a pass may use besides the model."""

    workdir: Path
    """A scratch directory private to this candidate (removed afterwards)."""
    calibration: Sequence[Feed] = field(default_factory=list)
    """Calibration samples, never used for evaluation. In a search they are read from
    disk on access (one sample per index), so iterate instead of copying them all."""
    threads: int = 1
    memory: int | None = None
    """Bytes of RSS the pass's process may use (``--max-memory`` less what the search
    holds); over it the process is killed. Plan batches from it; None means no limit."""
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("slimfleet.pass"))
    metrics: dict[str, str] = field(default_factory=dict)
    """The task metrics the user gave for outputs (``--metric``), ``OUTPUT -> KIND[:OPT=V,...]``:
    what a pass whose loss follows the task (``qat``, ``prune_refit``'s distillation)
    aims at instead of the metric it would detect."""


@dataclass
class PassResult:
    """A pass's output. ``changed`` False means the model is as it came in."""

    model: onnx.ModelProto
    changed: bool
    notes: str = ""
    """One line for the report, e.g. "quantized 12 MatMul, 1 LSTM; kept 3 Conv in float"."""


class Pass:
    """Base class of a compression pass.

    Subclasses set ``name``, ``description`` and ``options`` and implement
    :meth:`check` and :meth:`apply`. ``apply`` must not modify its input model.

    Every method that takes ``options`` receives them **resolved**: the search calls
    :meth:`resolve_options` once per step, so every declared option is present with its
    default filled in and its value coerced and checked. A pass reads ``options[name]``
    and never resolves them again.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()
    lossless: ClassVar[bool] = False
    """True when outputs are expected to match the input model up to float rounding."""

    def is_lossless(self, options: dict[str, Any]) -> bool:
        """Whether this pass with these (resolved) options is lossless; ``lossless`` by default."""
        return self.lossless

    def min_opset(self, options: dict[str, Any]) -> int:
        """The lowest ai.onnx opset this pass needs; the runner upgrades the model first."""
        return 1

    def check(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> str | None:
        """Return None when the pass applies, else a one-line reason why it does not.

        Example reasons: "no LSTM, MatMul or Gemm nodes", "needs calibration data".
        """
        return None

    def apply(
        self, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
    ) -> PassResult:
        raise NotImplementedError

    def resolve_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults overlaid with ``given``; unknown names are an InputError."""
        declared = {o.name: o for o in self.options}
        for key in given:
            if key not in declared:
                known = ", ".join(declared) or "none"
                raise InputError(f"pass {self.name}: unknown option {key!r} (options: {known})")
        return {
            name: opt.coerce(given[name], self.name) if name in given else opt.default
            for name, opt in declared.items()
        }
