"""Energy meter sources (RAPL on a fake powercap tree, the CPU-time estimate) and CO2 helpers."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from evo_compress.fitness.energy import (
    DEFAULT_WATTS_PER_CORE,
    EnergyMeter,
    amortised_co2_per_1k,
    co2_grams,
    per_1k_tokens,
    rapl_package_zones,
)


def _zone(root: Path, name: str, label: str, energy: int, max_range: int | None) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "energy_uj").write_text(f"{energy}\n")
    (path / "name").write_text(f"{label}\n")
    if max_range is not None:
        (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    return path


def _set(path: Path, energy: int) -> None:
    # Atomic, as a sysfs read is: the meter's polling thread never sees a half-written file.
    tmp = path / "energy_uj.tmp"
    tmp.write_text(f"{energy}\n")
    os.replace(tmp, path / "energy_uj")


def _busy(seconds: float) -> None:
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def test_module_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, evo_compress.fitness.energy; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False"


def test_estimate_without_rapl_is_labelled_and_follows_cpu_time(tmp_path: Path) -> None:
    meter = EnergyMeter(powercap_root=tmp_path / "absent", watts_per_core=10.0)
    cpu0 = time.process_time()
    with meter:
        _busy(0.2)
    cpu = time.process_time() - cpu0
    result = meter.result
    assert result.method == "cpu-time-estimate" and result.measured is False
    assert result.joules == pytest.approx(cpu * 10.0, rel=0.1)
    assert result.joules >= 0.2 * 10.0 * 0.9
    assert result.seconds > 0
    assert "estimate" in result.details["scope"]
    assert result.to_dict()["measured"] is False
    assert DEFAULT_WATTS_PER_CORE == 15.0


def test_a_cuda_device_without_nvml_falls_back(tmp_path: Path) -> None:
    meter = EnergyMeter("cuda:0", powercap_root=tmp_path)
    with meter:
        pass
    assert meter.result.method == "cpu-time-estimate"


def test_rapl_sums_packages_not_subzones(tmp_path: Path) -> None:
    pkg0 = _zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000, 2**32)
    core0 = _zone(tmp_path, "intel-rapl:0:0", "core", 500, 2**32)
    pkg1 = _zone(tmp_path, "intel-rapl:1", "package-1", 7_000_000, 2**32)
    (tmp_path / "intel-rapl:2").mkdir()  # no readable counter: ignored
    assert rapl_package_zones(tmp_path) == [pkg0, pkg1]
    meter = EnergyMeter(powercap_root=tmp_path)
    with meter:
        _set(pkg0, 3_500_000)  # +2.5 J
        _set(core0, 9_000_000)  # inside package 0 already: must not be added
        _set(pkg1, 8_000_000)  # +1.0 J
    result = meter.result
    assert result.method == "rapl" and result.measured is True
    assert result.joules == pytest.approx(3.5)
    assert result.details["zones"]["intel-rapl:0 (package-0)"]["joules"] == pytest.approx(2.5)


def test_rapl_wraparound(tmp_path: Path) -> None:
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 990_000, 1_000_000)
    meter = EnergyMeter(powercap_root=tmp_path, poll_interval_s=3600)
    with meter:
        _set(pkg, 10_000)  # wrapped once: 10 000 + 1 000 000 - 990 000 = 20 000 uJ
    assert meter.result.joules == pytest.approx(0.02)
    assert meter.result.details["zones"]["intel-rapl:0 (package-0)"]["wraps"] == 1

    # Several wraps in one window are caught by polling between them.
    _set(pkg, 900_000)
    meter = EnergyMeter(powercap_root=tmp_path, poll_interval_s=3600)
    with meter:
        _set(pkg, 100_000)  # +200 000 (wrap)
        meter.poll()
        _set(pkg, 800_000)  # +700 000
        meter.poll()
        _set(pkg, 50_000)  # +250 000 (wrap)
    assert meter.result.joules == pytest.approx(1.15)
    assert meter.result.details["zones"]["intel-rapl:0 (package-0)"]["wraps"] == 2


def test_rapl_background_polling(tmp_path: Path) -> None:
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 0, 1_000_000)
    meter = EnergyMeter(powercap_root=tmp_path, poll_interval_s=0.01)
    with meter:
        _set(pkg, 600_000)
        deadline = time.monotonic() + 5
        while meter._zones[0].total_uj == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert meter._zones[0].total_uj == 600_000  # read by the thread, not the exit
        _set(pkg, 100_000)  # wrap after the thread's read: +500 000
    assert meter.result.joules == pytest.approx(1.1)


def test_rapl_going_backwards_without_a_range_is_an_error(tmp_path: Path) -> None:
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 5_000, None)
    meter = EnergyMeter(powercap_root=tmp_path, poll_interval_s=3600)
    with pytest.raises(RuntimeError, match="went backwards"), meter:
        _set(pkg, 1_000)


def test_prefer_and_validation(tmp_path: Path) -> None:
    _zone(tmp_path, "intel-rapl:0", "package-0", 0, 1_000_000)
    meter = EnergyMeter(powercap_root=tmp_path, prefer=("cpu-time-estimate",))
    with meter:
        pass
    assert meter.result.method == "cpu-time-estimate"
    with pytest.raises(RuntimeError, match="before its window"):
        EnergyMeter().result  # noqa: B018
    with pytest.raises(ValueError, match="watts_per_core"):
        EnergyMeter(watts_per_core=0)
    with pytest.raises(ValueError, match="prefer"):
        EnergyMeter(prefer=("wattmeter",))  # type: ignore[arg-type]
    meter = EnergyMeter(powercap_root=tmp_path / "absent", prefer=("rapl",))
    with pytest.raises(RuntimeError, match="no energy source"), meter:
        pass


def test_co2_helpers() -> None:
    # 1 kWh at 400 g/kWh is 400 g.
    assert co2_grams(3.6e6, 400.0) == pytest.approx(400.0)
    assert co2_grams(0.0, 400.0) == 0.0
    assert per_1k_tokens(50.0, 2_000) == pytest.approx(25.0)
    # 36 MJ (10 kWh) of compression at 400 g/kWh = 4 kg over 1e9 tokens: 4e-3 g per 1k.
    assert amortised_co2_per_1k(3.6e7, 400.0, 1e9) == pytest.approx(4e-3)
    with pytest.raises(ValueError, match="tokens"):
        per_1k_tokens(1.0, 0)
    with pytest.raises(ValueError, match="joules"):
        co2_grams(-1.0, 400.0)
    with pytest.raises(ValueError, match="grid_intensity"):
        co2_grams(1.0, 0.0)
