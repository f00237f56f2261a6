"""What every benchmark prints first: the CPU it ran on, since figures differ between CPUs."""

import platform

from cmb_workflow.models import cpu_flags, cpu_model_name

# Instruction sets that change TensorFlow's and ITK's speed.
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_description() -> str:
    """'<model name> [<notable flags>]' from /proc/cpuinfo."""
    flags = cpu_flags()
    model = cpu_model_name() or platform.processor() or "unknown CPU"
    return f"{model} [{' '.join(flag for flag in NOTABLE_FLAGS if flag in flags)}]"
