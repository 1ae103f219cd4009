"""GPUs: hardware profiles (``profiles/*.toml``, every figure with its source) and detection through NVML.

``resolve_profile("h100")`` finds a profile by a forgiving name; ``detect_gpus()`` lists the NVIDIA GPUs NVML
sees (an empty list, with the reason, when there is no driver or no GPU).
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnknownNameError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _profile_dirs() -> list[Path]:
    here = Path(__file__).resolve().parent
    return [here.parent / "profiles", here / "profiles"]


@dataclass(frozen=True)
class Figure:
    """One number about a GPU and where it comes from."""

    value: float
    source: str
    unit: str = ""


@dataclass(frozen=True)
class GPUProfile:
    """A GPU's memory, bandwidth and dense peak FLOP/s."""

    name: str
    title: str
    memory_bytes: Figure
    memory_bandwidth: Figure
    bf16_flops: Figure
    fp32_flops: Figure
    aliases: tuple[str, ...] = ()
    nvml_names: tuple[str, ...] = ()
    path: str = ""

    def peak_flops(self, dtype_name: str) -> float:
        """Dense peak FLOP/s for matmuls in ``dtype_name`` (16-bit types use the bf16 tensor figure)."""
        return self.bf16_flops.value if dtype_name in ("bf16", "fp16") else self.fp32_flops.value

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "title": self.title,
            **{k: {"value": getattr(self, k).value, "unit": getattr(self, k).unit, "source": getattr(self, k).source}
               for k in ("memory_bytes", "memory_bandwidth", "bf16_flops", "fp32_flops")},
        }


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", ""))


@cache
def profiles() -> dict[str, GPUProfile]:
    """Every profile found in ``profiles/``, by canonical name."""
    out: dict[str, GPUProfile] = {}
    for d in _profile_dirs():
        for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
            raw = tomllib.loads(path.read_text())
            figs = {k: Figure(float(raw[k]["value"]), raw[k]["source"], raw[k].get("unit", unit))
                    for k, unit in (("memory_bytes", "bytes"), ("memory_bandwidth", "bytes/s"),
                                    ("bf16_flops", "FLOP/s"), ("fp32_flops", "FLOP/s"))}
            figs["memory_bytes"] = replace(figs["memory_bytes"], value=int(figs["memory_bytes"].value))
            prof = GPUProfile(name=raw["name"], title=raw.get("title", raw["name"]), aliases=tuple(raw.get("aliases", ())),
                              nvml_names=tuple(raw.get("nvml_names", ())), path=str(path), **figs)
            out.setdefault(prof.name, prof)
    return out


def resolve_profile(name: str) -> GPUProfile:
    """A profile by canonical name, alias or any spelling of them (``H100-SXM-80GB``, ``h100``)."""
    key = _key(name)
    for prof in profiles().values():
        if key in {_key(prof.name), *(_key(a) for a in prof.aliases)}:
            return prof
    # a prefix of one profile's name or alias (``l40`` -> l40s); of several (``a100``: 40 or 80 GB) it is an error
    starts = sorted({p.name for p in profiles().values()
                     if key and any(k.startswith(key) for k in (_key(p.name), *(_key(a) for a in p.aliases)))})
    if len(starts) == 1:
        return profiles()[starts[0]]
    if starts:
        raise ConfigError(f"GPU profile {name!r} matches {', '.join(starts)}; name one of them")
    raise UnknownNameError("GPU profile", name, sorted(profiles()))


def profile_for_device_name(device_name: str) -> GPUProfile | None:
    """The profile matching an NVML / CUDA device name such as ``NVIDIA H100 80GB HBM3``, if any."""
    key = _key(device_name)
    best: tuple[int, GPUProfile] | None = None
    for prof in profiles().values():
        for pat in prof.nvml_names:
            k = _key(pat)
            if k and k in key and (best is None or len(k) > best[0]):
                best = (len(k), prof)
    return best[1] if best else None


@dataclass(frozen=True)
class GPUInfo:
    """One GPU as NVML reports it."""

    index: int
    name: str
    memory_total: int
    memory_free: int
    driver: str
    compute_capability: str
    profile: str | None = None


@dataclass(frozen=True)
class GPUReport:
    """The GPUs found, or why none were."""

    gpus: list[GPUInfo] = field(default_factory=list)
    reason: str = ""


def detect_gpus() -> GPUReport:
    """Query NVML (nvidia-ml-py). No driver, no library or no GPU -> an empty report with the reason."""
    try:
        import pynvml
    except ImportError:  # pragma: no cover - it is a dependency
        return GPUReport(reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return GPUReport(reason=f"NVML unavailable ({e})")
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc = f"{major}.{minor}"
            except Exception:
                cc = "unknown"
            prof = profile_for_device_name(name)
            gpus.append(GPUInfo(i, name, int(mem.total), int(mem.free), driver, cc, prof.name if prof else None))
        return GPUReport(gpus=gpus, reason="" if gpus else "NVML found no GPU")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
