"""The README's first command, as a newcomer runs it: the demo starts, answers, reports, and stops."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

from ops.launcher import REPO_ROOT


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_demo_answers_every_prompt_prints_the_comparison_and_stops_everything() -> None:
    process = subprocess.run([sys.executable, "-m", "ops.demo", "--count", "80"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=400)
    out = process.stdout
    assert process.returncode == 0, out + process.stderr
    rows = {m.group(1).strip(): (m.group(2), m.group(3))
            for m in re.finditer(r"^([a-z ]+?)\s{2,}(\S+)\s+(\S+)$", out, re.MULTILINE)}
    assert rows["prompts submitted"] == ("80", "80")
    assert rows["answered"] == ("80", "80")
    cohort_calls, baseline_calls = (int(x) for x in rows["upstream model calls"])
    assert baseline_calls == 80 and 0 < cohort_calls < 80
    cohort_cost, baseline_cost = (float(x) for x in rows["cost"])
    assert 0 < cohort_cost < baseline_cost
    assert "Stopped everything the demo started." in out
    ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+)", out)]
    assert len(ports) == 3 and not any(_port_open(p) for p in ports), "a server the demo started is still up"
