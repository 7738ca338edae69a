"""What every benchmark script shares: where results go and how they are written."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine(**extra: Any) -> dict[str, Any]:
    """The machine a figure was measured on (no host names or paths)."""
    return {"cpu_count": os.cpu_count(), **extra, "platform": platform.platform(), "python": platform.python_version()}


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` atomically: an interrupted benchmark never leaves a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
