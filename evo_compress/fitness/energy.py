"""Energy over a measurement window (NVML, RAPL, or an estimate from CPU time) and CO2 helpers.

Sources, best first: the GPU's NVML total-energy counter, the CPU package RAPL counters, and
otherwise an estimate, process CPU seconds x a watts-per-busy-core figure. Every result says
which one it used and whether it was measured, so records and reports can say "estimated".
No torch import at module level: this module is also used where torch is not installed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

Method = Literal["nvml", "rapl", "cpu-time-estimate"]

DEFAULT_WATTS_PER_CORE = 15.0
"""Watts drawn per fully busy CPU core in the estimate: about a 2020s server core at load
(a 200-300 W TDP package of 16-32 cores), DRAM and idle power left out. A rough figure: set
``watts_per_core`` for the machine at hand when the estimate matters."""

DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class EnergyResult:
    """Energy used over one window. ``measured`` is False for the CPU-time estimate."""

    joules: float
    seconds: float
    method: Method
    measured: bool
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "joules": self.joules,
            "seconds": self.seconds,
            "method": self.method,
            "measured": self.measured,
            "details": dict(self.details),
        }


@dataclass
class _RaplZone:
    name: str
    path: Path
    max_range_uj: int
    last_uj: int
    total_uj: int = 0
    wraps: int = 0


def rapl_package_zones(root: Path = DEFAULT_POWERCAP_ROOT) -> list[Path]:
    """Top-level RAPL zones (``intel-rapl:N``, one per CPU package) whose counter is readable.

    Sub-zones (``intel-rapl:N:M``: core, uncore, dram) are left out: core and uncore are
    already inside the package figure, so adding them would count energy twice.
    """
    zones: list[Path] = []
    if not root.is_dir():
        return zones
    for path in sorted(root.glob("intel-rapl:*")):
        if path.name.count(":") != 1:
            continue
        try:
            int((path / "energy_uj").read_text())
        except (OSError, ValueError):
            continue
        zones.append(path)
    return zones


def nvml_device_handle(pynvml: Any, device: str, env: Mapping[str, str] | None = None) -> Any:
    """NVML's handle of the GPU that CUDA calls ``device``. NVML numbers GPUs physically and
    ignores ``CUDA_VISIBLE_DEVICES``, which renumbers them for CUDA (a parallel worker pinned
    to GPU 3 sees it as cuda:0): map through it, by index or by UUID. ``env`` is the
    environment of the process that uses the GPU (default: this one's)."""
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if visible:
        entries = [e.strip() for e in visible.split(",") if e.strip()]
        if index >= len(entries):
            raise ValueError(f"{device} is not among CUDA_VISIBLE_DEVICES={visible}")
        entry = entries[index]
        if not entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        index = int(entry)
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _nvml_handle(device: str, env: Mapping[str, str] | None = None) -> tuple[Any, Any] | None:
    """(pynvml module, handle) for a CUDA device whose energy counter works, else None."""
    if not device.startswith("cuda"):
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = nvml_device_handle(pynvml, device, env)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # no driver, no GPU, or a GPU without the counter (pre-Volta)
        return None
    return pynvml, handle


class EnergyMeter:
    """Context manager measuring energy between ``__enter__`` and ``__exit__``.

    ``device`` picks the source: a CUDA device uses NVML when pynvml imports and the GPU has
    the total-energy counter (the whole GPU, every process on it); otherwise the CPU package
    RAPL counters under ``powercap_root`` when readable (the whole package, every process);
    otherwise the estimate ``process CPU seconds x watts_per_core`` (this process only).
    ``prefer`` restricts the sources tried, in order. RAPL counters wrap around at
    ``max_energy_range_uj`` (a few kJ, under a minute at full load on some CPUs), so a
    background thread reads them every ``poll_interval_s`` and each wrap is added back.

    >>> with EnergyMeter() as meter:
    ...     work()
    >>> meter.result.joules, meter.result.measured
    """

    def __init__(
        self,
        device: str = "cpu",
        *,
        watts_per_core: float = DEFAULT_WATTS_PER_CORE,
        powercap_root: Path | str = DEFAULT_POWERCAP_ROOT,
        prefer: tuple[Method, ...] = ("nvml", "rapl", "cpu-time-estimate"),
        poll_interval_s: float = 1.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if watts_per_core <= 0:
            raise ValueError(f"`watts_per_core` must be > 0, got {watts_per_core}")
        if poll_interval_s <= 0:
            raise ValueError(f"`poll_interval_s` must be > 0, got {poll_interval_s}")
        unknown = [m for m in prefer if m not in ("nvml", "rapl", "cpu-time-estimate")]
        if unknown or not prefer:
            raise ValueError(f"`prefer` must list nvml, rapl or cpu-time-estimate, got {prefer}")
        self.device = str(device)
        self.watts_per_core = float(watts_per_core)
        self.powercap_root = Path(powercap_root)
        self.prefer = tuple(prefer)
        self.poll_interval_s = float(poll_interval_s)
        self.env = env  # the measured process's environment: which GPU `device` is
        self.method: Method | None = None
        self._result: EnergyResult | None = None
        self._nvml: tuple[Any, Any] | None = None
        self._nvml_start_mj = 0
        self._zones: list[_RaplZone] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._cpu0 = 0.0

    @property
    def result(self) -> EnergyResult:
        if self._result is None:
            raise RuntimeError("the energy meter has no result before its window has closed")
        return self._result

    def _choose(self) -> Method:
        for method in self.prefer:
            if method == "nvml":
                self._nvml = _nvml_handle(self.device, self.env)
                if self._nvml is not None:
                    return "nvml"
            elif method == "rapl":
                zones = rapl_package_zones(self.powercap_root)
                if zones:
                    self._zones = [self._open_zone(z) for z in zones]
                    return "rapl"
            else:
                return "cpu-time-estimate"
        raise RuntimeError(f"no energy source available among {list(self.prefer)}")

    @staticmethod
    def _open_zone(path: Path) -> _RaplZone:
        try:
            max_range = int((path / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            max_range = 0  # unknown: a decrease is then reported, not guessed
        name = path.name
        with contextlib.suppress(OSError):
            name = (path / "name").read_text().strip() or name
        return _RaplZone(name, path, max_range, int((path / "energy_uj").read_text()))

    def poll(self) -> None:
        """Read the RAPL counters now, adding what they gained (wraps included) since the last
        read. Called at the window's ends and by the background thread; a no-op otherwise."""
        with self._lock:
            for zone in self._zones:
                now = int((zone.path / "energy_uj").read_text())
                if now >= zone.last_uj:
                    zone.total_uj += now - zone.last_uj
                elif zone.max_range_uj > 0:
                    zone.total_uj += now + zone.max_range_uj - zone.last_uj
                    zone.wraps += 1
                else:
                    raise RuntimeError(
                        f"RAPL counter {zone.path} went backwards and its wrap range is unknown"
                    )
                zone.last_uj = now

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            self.poll()

    def __enter__(self) -> EnergyMeter:
        self._result = None
        self.method = self._choose()
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()
        if self.method == "nvml":
            assert self._nvml is not None
            pynvml, handle = self._nvml
            self._nvml_start_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        elif self.method == "rapl":
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._poll_loop, name="evo-compress-rapl", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        seconds = time.perf_counter() - self._t0
        cpu_seconds = time.process_time() - self._cpu0
        details: dict[str, Any] = {"cpu_seconds": cpu_seconds, "device": self.device}
        if self.method == "nvml":
            assert self._nvml is not None
            pynvml, handle = self._nvml
            end_mj = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            joules = (end_mj - self._nvml_start_mj) / 1000.0
            details["scope"] = "whole GPU (every process on it), CPU and host memory not included"
            self._result = EnergyResult(joules, seconds, "nvml", True, details)
        elif self.method == "rapl":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self.poll()
            joules = sum(z.total_uj for z in self._zones) / 1e6
            details["scope"] = "CPU packages (every process on them), DRAM not included"
            details["zones"] = {
                f"{z.path.name} ({z.name})": {"joules": z.total_uj / 1e6, "wraps": z.wraps}
                for z in self._zones
            }
            self._result = EnergyResult(joules, seconds, "rapl", True, details)
        else:
            joules = cpu_seconds * self.watts_per_core
            details["watts_per_core"] = self.watts_per_core
            details["scope"] = (
                "estimate: this process's CPU seconds x watts per busy core; "
                "not measured, idle and other processes not included"
            )
            self._result = EnergyResult(joules, seconds, "cpu-time-estimate", False, details)


def describe_energy(result: EnergyResult, window: str, whose: str = "process") -> str:
    """How an energy figure was obtained, for records and reports: which counter over which
    window, or that it is an estimate and from what."""
    if result.method == "nvml":
        return f"NVML total-energy counter of the GPU over {window}"
    if result.method == "rapl":
        return f"RAPL package counters over {window}"
    watts = result.details.get("watts_per_core", "configured")
    return (
        f"estimated: {whose} CPU time x {watts} W per core over {window} "
        "(no power counter readable)"
    )


def co2_grams(joules: float, grid_intensity_g_per_kwh: float) -> float:
    """Grams CO2e emitted by ``joules`` of electricity at a grid intensity in g CO2e/kWh."""
    if joules < 0:
        raise ValueError(f"`joules` must be >= 0, got {joules}")
    if grid_intensity_g_per_kwh <= 0:
        raise ValueError(f"`grid_intensity_g_per_kwh` must be > 0, got {grid_intensity_g_per_kwh}")
    return joules / JOULES_PER_KWH * grid_intensity_g_per_kwh


def per_1k_tokens(value: float, tokens: float) -> float:
    """``value`` spread over ``tokens`` tokens, per 1,000 tokens."""
    if tokens <= 0:
        raise ValueError(f"`tokens` must be > 0, got {tokens}")
    return value * 1000.0 / tokens


def amortised_co2_per_1k(
    one_time_joules: float, grid_intensity_g_per_kwh: float, deployment_tokens: float
) -> float:
    """One-time energy (compression, calibration, recovery training) as g CO2e per 1,000 of
    the ``deployment_tokens`` the deployment will serve; add it to the serving CO2."""
    return per_1k_tokens(co2_grams(one_time_joules, grid_intensity_g_per_kwh), deployment_tokens)


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's waited-for child processes so far: the
    difference around a subprocess is its CPU time, which a CPU-time energy estimate of this
    process alone would miss."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return float(usage.ru_utime + usage.ru_stime)
