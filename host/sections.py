"""The contract for a plugin's addition to the compress report (``slimfleet_report_section``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ReportSection:
    """A plugin's addition to the report: a title, a paragraph, and key/value figures.

    ``data`` must be JSON-serialisable; ``report.html`` shows it as a table and
    ``report.json`` stores the section under ``sections``.
    """

    title: str
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
