from __future__ import annotations

from typing import Annotated

import typer

from ...hardware import detect_gpus, profiles
from ..common import DebugOpt, JsonOpt, emit_json, handle_errors, human_bytes, human_count, stdout, table

NAME = "gpus"
HELP = "NVIDIA GPUs found through NVML, and the hardware profiles usable with --gpu."

NO_GPU = "no NVIDIA GPU found; planning for --gpu PROFILE or CPU"


def command(
    list_profiles: Annotated[bool, typer.Option(
        "--profiles", help="Also list the hardware profiles (listed anyway when no GPU is found; always in --json).")
    ] = False,
    json_: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    with handle_errors(debug):
        report = detect_gpus()
        if json_:
            emit_json({"gpus": [g.__dict__ for g in report.gpus], "reason": report.reason or None,
                       "profiles": [p.as_dict() for p in profiles().values()]})
            return
        if not report.gpus:
            stdout.print(f"{NO_GPU} ({report.reason})", highlight=False)
        else:
            stdout.print(table("GPUs (NVML)", ["#", "name", "memory total", "memory free", "driver", "compute",
                                               "profile"],
                               [[g.index, g.name, human_bytes(g.memory_total), human_bytes(g.memory_free),
                                 g.driver, g.compute_capability, g.profile or "-"] for g in report.gpus]))
        if list_profiles or not report.gpus:
            stdout.print(table("hardware profiles (--gpu NAME)", ["name", "GPU", "memory", "bandwidth",
                                                                 "bf16 dense", "fp32"],
                               [[p.name, p.title, human_bytes(p.memory_bytes.value),
                                 human_count(p.memory_bandwidth.value, "B/s"), human_count(p.bf16_flops.value, "FLOP/s"),
                                 human_count(p.fp32_flops.value, "FLOP/s")] for p in profiles().values()]))
