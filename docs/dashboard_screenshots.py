"""Screenshots of the live dashboard in headless Chromium, for the README and for review.

    python docs/dashboard_screenshots.py STUDY.toml [--out DIR] [--dest docs]

Starts the real ``search dashboard`` on a free loopback port for a study that has run
(``search start``), then saves into ``--dest``:

* ``dashboard-study.png``: the study page, with the *Best Trial* box and the history plot
  (infeasible trials in grey);
* ``dashboard-infeasible-trial.png``: the page of an infeasible search trial (its
  ``gate_status`` user attr says which gate failed and by how much).

It prints which trials it shows and what the dashboard serves as best, so the pictures can be
checked against ``search status``. Needs ``chromium`` on PATH (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 180.0  # a hang guard: the command imports torch before it serves
WINDOW = "1400,1150"  # the trial page
STUDY_WINDOW = "1400,1850"  # the study page down to the Best Trial box
RENDER_BUDGET_MS = "20000"  # Chromium's virtual time for the page's fetches and plots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the study file of a study that has run")
    parser.add_argument("--out", help="the study's output folder, if not the file's")
    parser.add_argument("--dest", type=Path, default=REPO / "docs", help="where the PNGs go (default docs/)")
    args = parser.parse_args(argv)
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("error: chromium is not on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [sys.executable, "-m", "search.cli", "dashboard", str(args.study), "--port", str(port)]
    if args.out:
        command += ["--out", args.out]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # the URL line, once it serves
        match = re.search(r"(http://\S+/dashboard/studies/(\d+))", line)
        if match is None:
            print(f"error: search dashboard did not start: {line.strip()}", file=sys.stderr)
            return 2
        study_url, study_id = match.group(1), int(match.group(2))
        base = f"http://127.0.0.1:{port}"
        detail = _wait_for_detail(base, study_id)
        infeasible = [t for t in detail["trials"] if _attrs(t).get("kind") == "search"
                      and t["state"] == "Complete" and any(c > 0 for c in t["constraints"])]
        best = [t["number"] for t in detail["best_trials"]]
        print(f"study {detail['name']!r}: {len(detail['trials'])} trials, "
              f"{len(infeasible)} infeasible search trials; the Best Trial box holds {best}")
        args.dest.mkdir(parents=True, exist_ok=True)
        _shoot(browser, study_url, args.dest / "dashboard-study.png", STUDY_WINDOW)
        if infeasible:
            trial = infeasible[-1]
            print(f"infeasible trial {trial['number']}: {_attrs(trial).get('gate_status', '(no gate_status)')}")
            _shoot(browser, f"{study_url}/trials?numbers={trial['number']}",
                   args.dest / "dashboard-infeasible-trial.png", WINDOW)
        else:
            print("no infeasible search trial: dashboard-infeasible-trial.png not made")
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    return 0


def _wait_for_detail(base: str, study_id: int) -> Any:
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=30) as response:  # noqa: S310
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _attrs(trial: Any) -> dict[str, str]:
    return {a["key"]: a["value"] for a in trial["user_attrs"]}


def _shoot(browser: str, url: str, path: Path, window: str) -> None:
    """One screenshot, written to a temporary name first and renamed into place."""
    with tempfile.TemporaryDirectory() as profile:
        tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}{path.suffix}")  # chromium wants .png
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={window}",
             f"--virtual-time-budget={RENDER_BUDGET_MS}", f"--screenshot={tmp}", url],
            check=True, capture_output=True, timeout=300,
        )
        os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
