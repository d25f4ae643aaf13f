"""What machine a benchmark ran on, for the line above its table.

Imported by the scripts beside it as `from machine import cpu_model` (a script's own folder
is on its import path); it needs nothing beyond the standard library, so it also runs on a
bare GPU machine.
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers: cloud machines often show only a
    generic name such as "Intel Xeon Processor", and the numbers tell the generations apart."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine() or "unknown"
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    if "cpu family" not in fields:
        return name  # not an x86 /proc/cpuinfo
    return f"{name} (family {fields['cpu family']}, model {fields.get('model')})"
