"""`precondtune gpus` with and without NVML, and hardware profiles."""
from __future__ import annotations

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from precondtune.cli import app
from precondtune.errors import UnknownNameError
from precondtune.hardware import profiles, resolve_profile

runner = CliRunner()
REQUIRED = ["h100-sxm-80gb", "h100-pcie-80gb", "h200-141gb", "a100-40gb", "a100-80gb", "l40s", "l4", "a10g",
            "rtx-4090", "rtx-3090", "v100-32gb"]


def test_profiles_present_with_sources():
    found = profiles()
    for name in REQUIRED:
        prof = found[name]
        for fig in (prof.memory_bytes, prof.memory_bandwidth, prof.bf16_flops, prof.fp32_flops):
            assert fig.value > 0 and len(fig.source) > 10


def test_every_profile_reads_its_datasheet_gb_as_gib():
    """One unit for all: "80GB" is 80 GiB, "141GB" is 141 GiB (141e9 bytes put the H200 9 GiB below what it has)."""
    import re

    for name, prof in profiles().items():
        gb = re.search(r"(\d+)\s*GB", prof.title) or re.search(r"(\d+)\s*GB", prof.memory_bytes.source)
        assert gb, name
        assert prof.memory_bytes.value == int(gb.group(1)) << 30, (name, prof.memory_bytes.value)


@pytest.mark.parametrize("spelling", ["h100", "H100-SXM-80GB", "h100_sxm_80gb", "NVIDIA H100 SXM5"])
def test_forgiving_names(spelling):
    assert resolve_profile(spelling).name == "h100-sxm-80gb"


def test_a_prefix_of_one_profile_finds_it_and_of_several_is_an_error():
    from precondtune.errors import ConfigError

    assert resolve_profile("l40").name == "l40s"
    for ambiguous, names in (("a100", "a100-40gb, a100-80gb"), ("rtx", "rtx-3090, rtx-4090")):
        with pytest.raises(ConfigError, match=names):
            resolve_profile(ambiguous)


def test_profiles_in_json_carry_units_and_integer_bytes():
    doc = json.loads(runner.invoke(app, ["gpus", "--json"]).stdout)
    for prof in doc["profiles"]:
        assert prof["memory_bytes"]["unit"] == "bytes" and isinstance(prof["memory_bytes"]["value"], int)
        assert prof["memory_bandwidth"]["unit"] == "bytes/s" and prof["bf16_flops"]["unit"] == "FLOP/s"


def test_unknown_profile_lists_known_ones():
    with pytest.raises(UnknownNameError, match="a100-40gb"):
        resolve_profile("tpu-v5")


class _Mem:
    total, free = 80 * 2**30, 79 * 2**30


def _fake_pynvml(count: int, fail_init: bool = False) -> types.ModuleType:
    m = types.ModuleType("pynvml")

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    m.nvmlDeviceGetCount = lambda: count
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetMemoryInfo = lambda h: _Mem()
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    return m


def test_gpus_with_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(2))
    r = runner.invoke(app, ["gpus", "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert [g["name"] for g in doc["gpus"]] == ["NVIDIA H100 80GB HBM3"] * 2
    assert doc["gpus"][0]["profile"] == "h100-sxm-80gb" and doc["gpus"][0]["compute_capability"] == "9.0"
    assert doc["gpus"][0]["memory_total"] == 80 * 2**30 and doc["gpus"][0]["driver"] == "550.54.15"
    r = runner.invoke(app, ["gpus"])
    assert "H100" in r.stdout and "9.0" in r.stdout


@pytest.mark.parametrize("fail_init,count", [(True, 0), (False, 0)])
def test_gpus_without_nvml_says_so_and_exits_0(monkeypatch, fail_init, count):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(count, fail_init))
    r = runner.invoke(app, ["gpus"])
    assert r.exit_code == 0
    assert r.stdout.splitlines()[0].startswith("no NVIDIA GPU found; planning for --gpu PROFILE or CPU")


def test_optimizers_command_lists_registry():
    r = runner.invoke(app, ["optimizers", "--json"])
    assert r.exit_code == 0
    names = [o["name"] for o in json.loads(r.stdout)["optimizers"]]
    assert "adamw" in names


def test_profile_names_are_never_cut_in_a_narrow_terminal():
    """The name column holds what --gpu takes back; at 80 columns it read 'h100-pcie…'."""
    r = runner.invoke(app, ["gpus", "--profiles"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.stdout.splitlines()) <= 80
    for name in ("h100-pcie-80gb", "h100-sxm-80gb", "a100-80gb"):
        assert f"│ {name} " in r.stdout, name


def test_with_no_terminal_attached_tables_are_not_fitted_to_80_columns(monkeypatch):
    """In a job log (nohup, a batch scheduler, CI) rich fell back to 80 columns and cut values; COLUMNS still wins."""
    from precondtune.cli import common
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(common, "_on_a_terminal", lambda: False)
    r = runner.invoke(app, ["gpus", "--profiles"])
    assert r.exit_code == 0, r.output
    assert "NVIDIA A100 SXM4 40GB │  40.00 GiB │   1.55 TB/s │ 312.00 TFLOP/s │" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= common.LOG_WIDTH
    narrow = runner.invoke(app, ["gpus", "--profiles"], env={"COLUMNS": "80"})
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80
