"""The manifest's quantities as Kubernetes writes them: CPU in cores or millicores
('0.5', '100m'), memory in bytes with binary or decimal units ('256Mi', '1G')."""

from __future__ import annotations

import re

MEMORY_RE = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|K|M|G)?$")
MEMORY_UNITS = {None: 1, "K": 1000, "M": 1000**2, "G": 1000**3,
                "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def parse_cpu(value: str) -> int:
    """'100m' -> 100 millicores, '0.5' -> 500."""
    match = re.fullmatch(r"(\d+)m|(\d+(?:\.\d+)?)", value.strip())
    if not match:
        raise ValueError(f"cpu must look like '100m' or '0.5', got {value!r}")
    millis = int(match[1]) if match[1] else int(float(match[2]) * 1000)
    if millis <= 0:
        raise ValueError("cpu must be above zero")
    return millis


def parse_memory(value: str) -> int:
    """'256Mi' -> bytes; accepts Ki/Mi/Gi and K/M/G."""
    match = MEMORY_RE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"memory must look like '256Mi' or '1G', got {value!r}")
    size = int(float(match[1]) * MEMORY_UNITS[match[2]])
    if size < 6 * 1024**2:
        raise ValueError("memory must be at least 6Mi (Docker's minimum)")
    return size
