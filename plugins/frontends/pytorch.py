"""PyTorch front-end: an ``nn.Module``, a TorchScript ``.pt``/``.pth`` or an exported
program ``.pt2``, exported with the dynamo exporter first and the legacy (TorchScript)
exporter when dynamo fails or disagrees with the module.

Input names are ``forward``'s parameter names; the keys of ``--data`` must be those
names (any key is accepted for a single-input module). The batch axis and every axis
that varies across samples are exported as dynamic.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from slimfleet.agent.errors import InputError
from slimfleet.host.convert import (
    ConversionError,
    check,
    describe,
    dynamic_axes,
    missing_extra,
    one_line,
)
from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Feed

log = logging.getLogger(__name__)

OPSET = 18
"""The opset both exporters target (dynamo's lowest well-supported one)."""
QUIET_LOGGERS = (
    "torch",
    "torch.onnx._internal.exporter._registration",
    "torch.fx.experimental.symbolic_shapes",
    "torch._dynamo",
    "torch.export",
)
"""Loggers raised to ERROR while exporting: their warnings (one line per torchvision op
when torchvision is absent, whole graph dumps when dynamo gives up) say nothing the
one-line error does not; ``-vv`` still shows which exporter failed and why."""
SCRIPT_SUFFIXES = (".pt", ".pth")
EXPORTED_SUFFIX = ".pt2"


def _is_module(obj: Any) -> bool:
    return any(
        c.__name__ == "Module" and c.__module__ == "torch.nn.modules.module"
        for c in type(obj).__mro__
    )


def _torch(what: str) -> Any:
    try:
        import torch
    except ModuleNotFoundError:
        raise missing_extra(what, "torch") from None
    return torch


def _load(source: Any, torch: Any) -> Any:
    if _is_module(source):
        return source
    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        if path.suffix.lower() == EXPORTED_SUFFIX:
            return torch.export.load(str(path)).module()
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        kind = "an exported program" if path.suffix == EXPORTED_SUFFIX else "TorchScript"
        raise InputError(
            f"{path}: not {kind} ({one_line(exc)}); a state_dict needs its nn.Module: "
            "pass module:attr or the module itself"
        ) from None


def _parameter_names(module: Any) -> list[str] | None:
    schema = getattr(getattr(module, "forward", None), "schema", None)
    if schema is not None:  # TorchScript
        return [a.name for a in schema.arguments[1:]]
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return [p.name for p in params]


def _input_names(module: Any, feeds: Sequence[Feed], source: str) -> list[str]:
    keys = list(feeds[0])
    params = _parameter_names(module)
    if params is None or keys == params[: len(keys)]:
        return keys
    if len(keys) == 1 and len(params) >= 1:
        return keys  # a single input goes to the first parameter whatever its key
    if set(keys) <= set(params):
        return [p for p in params if p in keys]
    raise InputError(
        f"{source}: example inputs do not fit: forward takes ({', '.join(params)}), "
        f"--data has keys {keys}"
    )


def _flatten(value: Any, torch: Any) -> list[np.ndarray]:
    if isinstance(value, torch.Tensor):
        return [value.detach().cpu().numpy()]
    if isinstance(value, list | tuple):
        return [a for item in value for a in _flatten(item, torch)]
    if isinstance(value, dict):
        return [a for item in value.values() for a in _flatten(item, torch)]
    raise ConversionError(f"forward returned {type(value).__name__}, not tensors")


def _run(module: Any, feeds: Sequence[Feed], names: list[str], torch: Any, source: str):
    outputs = []
    with torch.no_grad():
        for i, feed in enumerate(feeds):
            args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names]
            try:
                outputs.append(_flatten(module(*args), torch))
            except ConversionError:
                raise
            except Exception as exc:
                raise InputError(
                    f"{source}: example inputs do not fit: forward failed on sample {i} "
                    f"({one_line(exc)})"
                ) from None
    return outputs


def _dynamo(module, args, names, outputs, axes, torch) -> onnx.ModelProto:
    dims = tuple({a: torch.export.Dim.DYNAMIC for a in axes[n]} for n in names)
    program = torch.onnx.export(
        module,
        tuple(args),
        dynamo=True,
        input_names=names,
        output_names=outputs,
        dynamic_shapes=dims,
        opset_version=OPSET,
        verbose=False,
    )
    return program.model_proto


def _legacy(module, args, names, outputs, axes, torch) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(
        module,
        tuple(args),
        buffer,
        dynamo=False,
        input_names=names,
        output_names=outputs,
        dynamic_axes={n: {a: f"{n}_dim{a}" for a in axes[n]} for n in names},
        opset_version=OPSET,
    )
    return onnx.load_from_string(buffer.getvalue())


def _example(module: Any, feeds: Sequence[Feed], names: list[str], torch: Any) -> list[Any]:
    """Two samples stacked on the batch axis, so the batch is not traced as 1; one sample
    when they do not stack or the module refuses a batch of two."""
    first = [torch.from_numpy(np.ascontiguousarray(feeds[0][n])) for n in names]
    second = [feeds[min(1, len(feeds) - 1)][n] for n in names]
    if not all(a.ndim and a.shape[1:] == b.shape[1:] for a, b in zip(first, second, strict=True)):
        return first
    pair = [
        torch.cat([a, torch.from_numpy(np.ascontiguousarray(b))])
        for a, b in zip(first, second, strict=True)
    ]
    try:
        with torch.no_grad():
            module(*pair)
    except Exception:
        return first
    return pair


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Quiet loggers, and capture what the exporters print (graph dumps) to DEBUG."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        if printed.getvalue().strip():
            log.debug("the exporter printed:\n%s", printed.getvalue()[-20000:])


@hookimpl
def slimfleet_convert(
    source: Any, example_inputs: Sequence[Feed], options: dict[str, Any]
) -> onnx.ModelProto | None:
    """Export a PyTorch module or file to ONNX, checked on the example inputs."""
    is_file = isinstance(source, str | Path) and Path(source).suffix.lower() in (
        *SCRIPT_SUFFIXES,
        EXPORTED_SUFFIX,
    )
    if not (is_file or _is_module(source)):
        return None
    name = describe(source)
    torch = _torch(name)
    module = _load(source, torch)
    with contextlib.suppress(NotImplementedError):  # an exported program's module is fixed
        module.eval()
    names = _input_names(module, example_inputs, name)
    expected = _run(module, example_inputs, names, torch, name)
    outputs = (
        ["output"] if len(expected[0]) == 1 else [f"output_{i}" for i in range(len(expected[0]))]
    )
    axes = dynamic_axes([{n: f[n] for n in names} for f in example_inputs])
    args = _example(module, example_inputs, names, torch)
    feeds = [{n: f[n] for n in names} for f in example_inputs]
    failures = []
    exporters = (
        [("legacy", _legacy)]
        if hasattr(module, "_c")
        else [("dynamo", _dynamo), ("legacy", _legacy)]
    )
    for label, export in exporters:  # TorchScript (has ._c) only exports the legacy way
        try:
            with warnings.catch_warnings(), _quiet():
                warnings.simplefilter("ignore")
                model = export(module, args, names, outputs, axes, torch)
        except Exception as exc:
            cause = exc.__cause__ or exc  # the onnx wrapper's own first line says only "step 1/3"
            failures.append(f"{label} exporter failed ({one_line(cause, 160)})")
            log.info("%s: %s", name, failures[-1])
            continue
        try:
            check(model, feeds, expected, f"{label} exporter")
        except ConversionError as exc:
            failures.append(str(exc))
            log.info("%s", exc)
            continue
        log.info(
            "%s: exported with the %s exporter, checked on %d samples", name, label, len(feeds)
        )
        return model
    raise ConversionError(f"{name}: no faithful ONNX export: {'; '.join(failures)}")
