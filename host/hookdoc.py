"""The README's hook reference, generated from the hookspec docstrings.

``python -m slimfleet.host.hookdoc`` prints it as Markdown: one section per hook with
its signature, whether the first result wins, and its docstring, in the order the hooks
are defined in :mod:`slimfleet.host.hookspecs`.
"""

from __future__ import annotations

import inspect

from slimfleet.host import hookspecs


def hooks() -> list[str]:
    """Hook names in definition order."""
    found = [
        (inspect.getsourcelines(obj)[1], name)
        for name, obj in vars(hookspecs).items()
        if name.startswith(f"{hookspecs.PROJECT}_") and inspect.isfunction(obj)
    ]
    return [name for _, name in sorted(found)]


def render() -> str:
    """Markdown for every hook: heading with the signature, then the docstring."""
    parts = ["## Hook reference\n", inspect.getdoc(hookspecs) or "", ""]
    for name in hooks():
        func = getattr(hookspecs, name)
        spec = getattr(func, f"{hookspecs.PROJECT}_spec", {})
        signature = str(inspect.signature(func)).replace("'", "")
        parts.append(f"### `{name}{signature}`\n")
        if spec.get("firstresult"):
            parts.append("*The first non-None result wins.*\n")
        parts.append((inspect.getdoc(func) or "") + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render())
