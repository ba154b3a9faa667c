"""Energy of the measured phase, read from the hardware's own counters, or nothing.

On CUDA: NVML's total-energy counter of each GPU this process sees
(``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver loaded; Volta and
later; needs ``pynvml`` from the ``nvidia-ml-py`` package, imported only there). On a CPU
under Linux: the RAPL package domains of the powercap interface
(``/sys/class/powercap/intel-rapl:<n>/energy_uj``, microjoules, wrapping at
``max_energy_range_uj``; often readable by root only). Where neither can be read nothing is
logged: the report says so, and no figure is estimated from a TDP.

The counters cover the whole device (every process on the GPU; the whole CPU package, this
benchmark's client and anything else running on it), so the figures are the machine's
energy while the phase ran, not the model's alone.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

POWERCAP_ROOT = Path("/sys/class/powercap")
#: a package domain: ``intel-rapl:<n>`` (``intel-rapl:<n>:<m>`` are its core/dram parts)
_PACKAGE_DIR = re.compile(r"intel-rapl:\d+")
#: the report's line where no job measured energy
NOT_MEASURED = "energy: not measured on this machine (no NVML, no RAPL)"
ENERGY_KEYS = ("energy_j", "joules_per_output_token", "avg_power_w")
SOURCE_PARAM = "energy_source"


@dataclass(frozen=True)
class RaplDomain:
    """One RAPL package domain: its counter file and the value it wraps at."""

    name: str
    energy_path: Path
    max_range_uj: int


def counter_delta(before: int, after: int, max_range: int) -> int:
    """How far a counter that wraps to 0 at ``max_range`` advanced from ``before`` to
    ``after`` (at most one wrap: RAPL ranges last minutes to hours at full power)."""
    return after - before if after >= before else after + max_range - before


def rapl_domains(root: Path = POWERCAP_ROOT) -> list[RaplDomain]:
    """The readable RAPL package domains under ``root`` (none where the tree is absent or
    the counters are root-only). Sub-domains (core, uncore, dram) are parts of their
    package and ``psys`` overlaps it, so only ``package-*`` domains are summed."""
    out: list[RaplDomain] = []
    if not root.is_dir():
        return out
    for d in sorted(root.iterdir()):
        if not _PACKAGE_DIR.fullmatch(d.name):
            continue
        try:
            name = (d / "name").read_text().strip()
            if not name.startswith("package"):
                continue
            int((d / "energy_uj").read_text())  # readable now, or not at all
            max_range = int((d / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            continue
        out.append(RaplDomain(name, d / "energy_uj", max_range))
    return out


def read_rapl(domains: Sequence[RaplDomain]) -> list[int]:
    """Each domain's counter now (microjoules)."""
    return [int(d.energy_path.read_text()) for d in domains]


def rapl_energy_j(domains: Sequence[RaplDomain], before: Sequence[int],
                  after: Sequence[int]) -> float:
    """Joules the package domains used between two readings, wrap-around included."""
    return sum(counter_delta(b, a, d.max_range_uj)
               for d, b, a in zip(domains, before, after, strict=True)) / 1e6


def nvml_energy_j(before_mj: Sequence[int], after_mj: Sequence[int]) -> float | None:
    """Joules the GPUs used between two readings of NVML's total-energy counters
    (millijoules, one per GPU); None when a counter went backwards (a driver reload)."""
    deltas = [a - b for b, a in zip(before_mj, after_mj, strict=True)]
    if not deltas or any(d < 0 for d in deltas):
        return None
    return sum(deltas) / 1000.0


def _nvml_handles() -> list[Any]:
    """NVML handles of the GPUs this process sees (torch's devices, matched by UUID so that
    ``CUDA_VISIBLE_DEVICES`` is honoured); empty when NVML or its energy counter is not
    available."""
    try:
        import pynvml
        import torch

        pynvml.nvmlInit()
        handles = []
        for i in range(torch.cuda.device_count()):
            uuid = str(getattr(torch.cuda.get_device_properties(i), "uuid", "") or "")
            if uuid:
                h = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid.removeprefix('GPU-')}")
            else:  # an old torch: NVML's order is the PCI order CUDA uses by default
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(h)  # pre-Volta: NVMLError here
            handles.append(h)
        return handles
    except Exception as e:  # no pynvml, no driver, no counter: energy is not measured
        log.info("energy: NVML not readable (%s)", e)
        return []


def _read_nvml(handles: Sequence[Any]) -> list[int]:
    import pynvml

    return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in handles]


class EnergyMeter:
    """``with EnergyMeter(device) as e: ...``: the energy the device used inside the block.

    ``device``: ``cuda`` reads NVML, ``cpu`` reads RAPL under ``root``. After the block,
    ``source`` is ``nvml``, ``rapl`` or None (not readable here), ``energy_j`` and
    ``seconds`` hold the reading. Reading never fails the job: a counter that cannot be
    read leaves ``source`` None."""

    def __init__(self, device: str, root: Path = POWERCAP_ROOT) -> None:
        self.device = device
        self.root = root
        self.source: str | None = None
        self.energy_j: float | None = None
        self.seconds: float = 0.0
        self._handles: list[Any] = []
        self._domains: list[RaplDomain] = []
        self._before: list[int] = []
        self._t0 = 0.0

    def __enter__(self) -> EnergyMeter:
        try:
            if self.device == "cuda":
                self._handles = _nvml_handles()
                self._before = _read_nvml(self._handles) if self._handles else []
            else:
                self._domains = rapl_domains(self.root)
                self._before = read_rapl(self._domains) if self._domains else []
        except Exception as e:  # a counter readable a moment ago is not now: not measured
            log.info("energy: counters not readable (%s)", e)
            self._handles, self._domains, self._before = [], [], []
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.seconds = time.perf_counter() - self._t0
        if not self._before:
            return
        try:
            if self._handles:
                self.energy_j = nvml_energy_j(self._before, _read_nvml(self._handles))
                self.source = "nvml" if self.energy_j is not None else None
            else:
                after = read_rapl(self._domains)
                self.energy_j = rapl_energy_j(self._domains, self._before, after)
                self.source = "rapl"
        except Exception as e:
            log.info("energy: counters not readable at the end (%s)", e)
            self.energy_j, self.source = None, None

    def metrics(self, output_tokens: int) -> dict[str, float]:
        """``energy_j``, ``avg_power_w`` and ``joules_per_output_token`` (with output
        tokens); empty when nothing was measured."""
        if self.source is None or self.energy_j is None:
            return {}
        out = {"energy_j": self.energy_j}
        if self.seconds > 0:
            out["avg_power_w"] = self.energy_j / self.seconds
        if output_tokens > 0:
            out["joules_per_output_token"] = self.energy_j / output_tokens
        return out


def source_for_device(device: str) -> str:
    """The counter :class:`EnergyMeter` reads for ``device``: ``nvml`` on CUDA, else
    ``rapl`` (the one it reports in ``source`` whenever it measured at all)."""
    return "nvml" if device == "cuda" else "rapl"
