"""Machine sizes: the ``[guest]`` table, the ``size`` presets, and Fly's memory rules.

Rules from fly-machines-api.md section 8: defaults are 1 shared CPU with 256 MB; memory is a
multiple of 256 MB and lies within a per-CPU range (shared 256..2048 MB per CPU, performance
2048..8192 MB per CPU). Presets are the names Fly uses (``shared-cpu-2x``, ``performance-4x``,
``a100-40gb``...).
"""

from __future__ import annotations

import difflib
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from jobrunner.machines.models import Guest
from jobrunner.spec.problems import Utf8Str, spec_error

__all__ = ["DEFAULT_SIZE", "SIZE_PRESETS", "GuestSpec", "preset_guest", "size_problem"]

CpuKind = Literal["shared", "performance"]

MEMORY_STEP_MB = 256
# Per-CPU memory range in MB, by CPU kind.
MEMORY_PER_CPU_MB: dict[str, tuple[int, int]] = {"shared": (256, 2048), "performance": (2048, 8192)}


class Preset(NamedTuple):
    cpu_kind: str
    cpus: int
    memory_mb: int
    gpu_kind: str | None = None
    gpus: int | None = None


def _presets() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}
    for n in (1, 2, 4, 6, 8):
        presets[f"shared-cpu-{n}x"] = Preset("shared", n, n * 256)
    for n in (1, 2, 4, 6, 8, 10, 12, 14, 16):
        presets[f"performance-{n}x"] = Preset("performance", n, n * 2048)
    # GPU presets are 8 performance CPUs with 32 GB and one GPU. The gpu_kind strings are the ones
    # flyctl passes for these presets (not spelled out in the shared API notes).
    gpu_kinds = {"a100-40gb": "a100-pcie-40gb", "a100-80gb": "a100-sxm4-80gb", "l40s": "l40s"}
    gpu_kinds["a10"] = "a10"
    for preset, gpu_kind in gpu_kinds.items():
        presets[preset] = Preset("performance", 8, 32768, gpu_kind, 1)
    return presets


SIZE_PRESETS: dict[str, Preset] = _presets()
DEFAULT_SIZE = "shared-cpu-1x"


def preset_guest(size: str) -> Guest:
    """The explicit guest of a size preset (``KeyError`` for an unknown preset)."""
    p = SIZE_PRESETS[size]
    return Guest(
        cpu_kind=p.cpu_kind, cpus=p.cpus, memory_mb=p.memory_mb, gpu_kind=p.gpu_kind, gpus=p.gpus
    )


def size_problem(size: str) -> tuple[str, str] | None:
    """``(message, fix)`` when ``size`` is not a known preset, else None."""
    if size in SIZE_PRESETS:
        return None
    close = difflib.get_close_matches(size, list(SIZE_PRESETS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return (
        "unknown size preset",
        f"{hint}use one of {', '.join(SIZE_PRESETS)}, or a [guest] table",
    )


class GuestSpec(BaseModel):
    """The ``[guest]`` table. Missing values are filled by :meth:`resolved`."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    cpus: int | None = Field(default=None, ge=1)
    memory_mb: int | None = Field(default=None, ge=1)
    cpu_kind: CpuKind | None = None
    gpu_kind: Utf8Str | None = None
    gpus: int | None = Field(default=None, ge=1)

    def resolved(self) -> Guest:
        """An explicit Guest: the kind defaults to shared (performance with a GPU), 1 CPU, and the
        smallest memory that kind allows."""
        kind = self.cpu_kind or ("performance" if self.gpu_kind else "shared")
        cpus = self.cpus or 1
        memory = self.memory_mb or MEMORY_PER_CPU_MB[kind][0] * cpus
        gpus = self.gpus if self.gpus is not None else (1 if self.gpu_kind else None)
        return Guest(cpu_kind=kind, cpus=cpus, memory_mb=memory, gpu_kind=self.gpu_kind, gpus=gpus)

    @model_validator(mode="after")
    def _check_memory(self) -> GuestSpec:
        guest = self.resolved()
        assert guest.cpu_kind is not None and guest.cpus is not None and guest.memory_mb is not None
        if self.gpus is not None and not self.gpu_kind:
            raise spec_error(
                "gpus needs a gpu_kind",
                'add gpu_kind (e.g. "a10"), or remove gpus',
                key="gpus",
            )
        if self.gpu_kind and guest.cpu_kind != "performance":
            raise spec_error(
                "GPUs run only with performance CPUs",
                'set cpu_kind = "performance", or remove gpu_kind',
                key="cpu_kind",
            )
        low, high = (n * guest.cpus for n in MEMORY_PER_CPU_MB[guest.cpu_kind])
        memory = guest.memory_mb
        if memory % MEMORY_STEP_MB or not low <= memory <= high:
            lower = max(low, memory - memory % MEMORY_STEP_MB)
            nearest = min(high, lower)
            raise spec_error(
                f"{memory} MB is not allowed for {guest.cpus} {guest.cpu_kind} CPU(s): "
                f"{guest.cpu_kind} CPUs take {MEMORY_PER_CPU_MB[guest.cpu_kind][0]}.."
                f"{MEMORY_PER_CPU_MB[guest.cpu_kind][1]} MB each, in steps of {MEMORY_STEP_MB}",
                f"use {low}..{high} MB (e.g. memory_mb = {nearest}), or change cpus or cpu_kind",
                key="memory_mb",
            )
        return self
