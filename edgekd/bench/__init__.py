"""``edgekd bench``: the stage (``stage.bench``) and what it is made of: the transport to a
board (``ssh``), the bundle it sends (``bundle``), the device profiles, the ToMe file
selection (``tome``) and the reports (``report``)."""

from edgekd.bench.profiles import PROFILES, DeviceProfile
from edgekd.bench.report import board_name, ok_hosts, render_markdown
from edgekd.bench.ssh import SSHOptions, Target
from edgekd.bench.stage import BenchResult, bench, check_reachable

__all__ = ["PROFILES", "BenchResult", "DeviceProfile", "SSHOptions", "Target", "bench", "board_name",
           "check_reachable", "ok_hosts", "render_markdown"]
