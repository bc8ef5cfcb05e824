"""The default ``slimfleet_apply_pass``: run the pass itself.

Registered ``trylast`` so a plugin that wraps or replaces pass application
(timing, caching, a remote runner) is called first.
"""

from __future__ import annotations

from typing import Any

import onnx

from slimfleet.host.hookspecs import hookimpl
from slimfleet.host.passes import Pass, PassContext, PassResult


@hookimpl(trylast=True)
def slimfleet_apply_pass(
    pass_: Pass, model: onnx.ModelProto, context: PassContext, options: dict[str, Any]
) -> PassResult:
    """Return ``pass_.apply(model, context, options)``."""
    return pass_.apply(model, context, options)
