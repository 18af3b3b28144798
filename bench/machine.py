"""The machine a benchmark ran on, as it goes into result file names and JSON."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(gpu: str | None = None, threads: int | None = None) -> str:
    """``<system>-<device>``: the GPU's name when the run used one, else the CPU model and the
    number of threads (``x<threads>``), lower case and dash-separated."""
    dev = gpu if gpu is not None else f"{cpu_model()} x{threads}" if threads is not None else cpu_model()
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{platform.system()}-{dev}").strip("-").lower()
