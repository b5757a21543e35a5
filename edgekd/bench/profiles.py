"""Device profiles: what ``--device rpi4`` expects of the board and how many threads it runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    threads: int
    arch: tuple[str, ...] = ()  # expected `uname -m`; empty: any
    board: str | None = None  # expected substring of the runner's machine["board"]
    remote: bool = True


PROFILES = {
    "local": DeviceProfile("local", threads=min(4, os.cpu_count() or 1), remote=False),
    "rpi4": DeviceProfile("rpi4", threads=4, arch=("aarch64", "armv7l"), board="Raspberry Pi 4"),
    "rpi5": DeviceProfile("rpi5", threads=4, arch=("aarch64",), board="Raspberry Pi 5"),
    "generic-arm64": DeviceProfile("generic-arm64", threads=4, arch=("aarch64",)),
}


def profile_warnings(profile: DeviceProfile, models: dict[str, Any]) -> list[str]:
    first = next(iter(models.values()))
    machine, warnings = first["machine"], []
    if first["threads"] < first.get("threads_requested", first["threads"]):
        warnings.append(f"asked for {first['threads_requested']} threads but the board gives this process "
                        f"{first['threads']} cores; ran with {first['threads']}")
    if profile.arch and machine.get("arch") not in profile.arch:
        warnings.append(f"profile {profile.name} expects {'/'.join(profile.arch)} but the board is "
                        f"{machine.get('arch')}")
    if profile.board and profile.board not in (machine.get("board") or ""):
        warnings.append(f"profile {profile.name} expects a '{profile.board}' but the board is "
                        f"{machine.get('board') or 'unnamed (no /proc/device-tree/model, no Model in /proc/cpuinfo)'}")
    if machine.get("throttled") not in (None, "0x0"):
        warnings.append(f"the board reports throttling {machine['throttled']} (power or heat); latencies may be high")
    return warnings

