"""What every benchmark prints first: the CPU it ran on, since figures differ between CPUs."""

import platform
from pathlib import Path

# Instruction sets that change TensorFlow's and ITK's speed.
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> str:
    """'<model name> [<notable flags>]' from /proc/cpuinfo."""
    flags = ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                     if line.startswith("model name"))
        flags = " ".join(flag for flag in NOTABLE_FLAGS if f" {flag}" in info)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model} [{flags}]"
