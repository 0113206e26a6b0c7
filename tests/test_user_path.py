"""The user's path: `make experiment` ends with the comparison report over every run in its results
folder (two models, one report), `make report` over results/, and live progress on the long
commands on a terminal (a pseudo-terminal here), none in a pipe or with --json.

Everything runs on the simulated engine with short windows, so the tests need no GPU and little time.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def make(target: str, cwd: Path, **variables: str) -> subprocess.CompletedProcess:
    """`make TARGET VAR=...` from the repository's Makefile, run in `cwd`, with the kvlab under test
    (this interpreter and this checkout's src) and no set-up step (the environment is installed)."""
    venv = Path(sys.prefix)
    extra = "cpu"
    argv = ["make", "-f", str(REPO / "Makefile"), "-o", str(venv / f".kvlab-setup-{extra}"), target,
            f"VENV={venv}", f"EXTRA={extra}", f"KVLAB={sys.executable} -m kvlab",
            *(f"{k}={v}" for k, v in variables.items())]
    # as a user runs it, from a shell: not as a sub-make of `make test` (a sub-make prints
    # "make[1]: Leaving directory ..." after the last line)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_two_make_experiments_end_in_one_report_of_both(tmp_path):
    """`make experiment MODEL=deepseek-v2-lite`, then `MODEL=llama-3.1-8b`: each prints the report's
    path last; the second report holds both models side by side, the MLA model compared with the
    GQA baseline; `kvlab report results/one` and `make report` work on the same runs."""
    cell = dict(QUANT="bf16", ENGINE="sim", GPU="h100", USERS="2", DURATION="4", WARMUP="0")
    first = make("experiment", tmp_path, MODEL="deepseek-v2-lite", **cell)
    assert first.returncode == 0, first.stderr[-3000:]
    report = tmp_path / "results" / "one" / "report" / "index.html"
    assert first.stdout.strip().splitlines()[-1] == "results/one/report/index.html" and report.is_file()
    second = make("experiment", tmp_path, MODEL="llama-3.1-8b", **cell)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.strip().splitlines()[-1] == "results/one/report/index.html"

    out = report.parent
    rec = json.loads((out / "report.json").read_text())
    assert rec["complete"] and rec["baseline"] == "llama-3.1-8b/bf16"
    assert any(s.startswith("deepseek-v2-lite/bf16 (MLA") and "llama-3.1-8b/bf16" in s for s in rec["headline"])
    head = {r["config"] for r in json.loads((out / "headline.json").read_text())}
    load = {r["config"] for r in json.loads((out / "under_load.json").read_text())}
    assert head == load == {"deepseek-v2-lite/bf16", "llama-3.1-8b/bf16"}
    md = (out / "summary.md").read_text()
    assert "| deepseek-v2-lite/bf16 |" in md and "| llama-3.1-8b/bf16 |" in md

    r = subprocess.run([sys.executable, "-m", "kvlab", "report", "results/one"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "results/one/report/index.html"
    r = make("report", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "results/report/index.html"
    assert {x["config"] for x in json.loads((tmp_path / "results" / "report" / "headline.json").read_text())} == head


# -- progress on a terminal -------------------------------------------------------------------------


def on_terminal(*args: str, timeout: float = 180, env: dict | None = None) -> tuple[int, str]:
    """`kvlab ARGS` with stdin, stdout and stderr on a pseudo-terminal (200 columns), as a user at a
    terminal runs it; (exit code, everything it wrote, colour codes removed)."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    # A terminal emulator sets TERM and the size comes from the pty: the environment the tests run in
    # (CI: TERM=dumb, COLUMNS) must not leak in, or rich reads an 80-column terminal without live display.
    base = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TTY_INTERACTIVE", "TTY_COMPATIBLE")}
    proc = subprocess.Popen([sys.executable, "-m", "kvlab", *args], stdin=slave, stdout=slave, stderr=slave,
                            env={**base, "TERM": "xterm-256color", **(env or {})}, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other end closed: the process is gone
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
    return code, ANSI.sub("", out.decode(errors="replace"))


def test_serve_shows_the_start_phase_and_the_timeout(tmp_path):
    """While `kvlab serve` waits for /health: the phase read from the server's log and the timeout;
    with --json nothing of it (the simulated server here answers /health 503 forever)."""
    args = ["serve", "llama-3.1-8b", "--engine", "sim", "--gpu", "h100", "--health-timeout", "10"]
    env = {"KVLAB_SIM_FAULT": "never-healthy"}
    code, out = on_terminal(*args, "--log", str(tmp_path / "a.log"), env=env)
    assert code == 2 and "no answer on" in out
    lines = set(re.findall(r"sim: ([a-zA-Z ]+), waiting for /health \(\d+ s of the 10 s timeout\)", out))
    # the phase read from the server's log (how soon the simulator gets there depends on the load)
    assert "starting the API server" in lines, lines
    code, out = on_terminal(*args, "--log", str(tmp_path / "b.log"), "--json", env=env)
    assert code == 2 and "no answer on" in out and "waiting for /health" not in out


def test_load_shows_users_requests_and_turns_in_flight(tmp_path):
    """`kvlab load` on a terminal: elapsed / duration, the user count (it said `users -` all along
    before), requests, turns in flight, failures, TTFT p50; with --json none of it."""
    from sim_process import SimServer

    server = SimServer("llama-3.1-8b", "--gpu", "h100")
    try:
        args = ["load", "--host", server.url, "--workload", "agent-smoke", "--users", "2", "--duration", "4"]
        code, out = on_terminal(*args, "--out", str(tmp_path / "a"))
        assert code == 0, out[-2000:]
        lines = re.findall(r"kvlab load: +\d+/4 s  users (\S+)  requests (\d+)(?: \(no turn has ended yet\))?"
                           r"  in flight (\d+)  failed 0  TTFT p50 ", out)
        assert lines and {u for u, _, _ in lines} == {"2"}, out[-2000:]
        assert not (tmp_path / "a" / "live").exists()  # the progress files are gone with the run
        assert json.loads((tmp_path / "a" / "load.json").read_text())["summary"]["requests"] > 0
        code, out = on_terminal(*args, "--out", str(tmp_path / "b"), "--json")
        assert code == 0 and "kvlab load:" not in out and '"summary"' in out
    finally:
        server.stop()


def test_plan_shows_searches_and_probes_per_config_and_defaults_to_agent(tmp_path):
    """`kvlab plan` without --workload plans the agent workload, and on a terminal shows the config
    searches done of those planned and each config's probes; with --json none of it."""
    args = ["plan", "--agents", "10", "--gpu", "h100", "--models", "llama-3.1-8b", "--quants", "bf16,fp8-kv",
            "--sim-s", "30", "--tolerance", "0.5", "--workers", "2"]
    env = {"KVLAB_CACHE": str(tmp_path / "cache")}
    code, out = on_terminal(*args, "--out", str(tmp_path / "a"), env=env)
    assert code == 0, out[-2000:]
    assert json.loads((tmp_path / "a" / "plan.json").read_text())["inputs"]["workload"]["name"] == "agent"
    assert re.search(r"plan: config searches done +[━╸╺]+ 1/2", out) and re.search(r"plan: config searches done +[━╸╺]+ 2/2", out)
    for label in ("llama-3.1-8b/bf16", "llama-3.1-8b/fp8-kv"):
        assert re.search(re.escape(label) + r" probes \(last: \d+ sessions, (coarse|fine): (pass|miss)\) +[━╸╺]+ \d+/\?", out)
        assert re.search(re.escape(label) + r" probes \(done: [\d,]+ sessions per replica\)", out)
    code, out = on_terminal(*args, "--out", str(tmp_path / "b"), "--json", env=env)
    assert code == 0 and "config searches done" not in out and " probes (" not in out
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["inputs"]["workload"]["name"] == "agent"


def test_no_progress_where_output_is_no_terminal(tmp_path):
    """In a pipe (a log, CI, `| tail`) the long commands print no progress display."""
    r = subprocess.run([sys.executable, "-m", "kvlab", "sim", "bench", "llama-3.1-8b", "--gpu", "h100",
                        "--num-prompts", "50"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "sim bench:" not in r.stderr + r.stdout and "Serving Benchmark Result" in r.stdout


def test_the_user_count_is_read_from_locusts_stats_history(tmp_path):
    """Locust writes its stats history header unquoted, and its last line may be cut off mid-write."""
    from kvlab.loadtest.records import LiveCounts
    from kvlab.loadtest.runner import _users_from_history

    path = tmp_path / "locust_stats_history.csv"
    header = ("Timestamp,User Count,Type,Name,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,99.9%,99.99%,"
              "100%,Total Request Count,Total Failure Count,Total Median Response Time,Total Average Response Time,"
              "Total Min Response Time,Total Max Response Time,Total Average Content Size\n")
    row = lambda users: f"1764730000,{users},,Aggregated,0.000000,0.000000,{','.join(['N/A'] * 11)},0,0,0,0.0,0,0,0\n"  # noqa: E731
    path.write_text(header)
    assert _users_from_history(path) is None
    path.write_text(header + row(3) + row(5) + "1764730002,7,,Aggre")
    assert _users_from_history(path) == 5
    (tmp_path / "live").mkdir()
    assert LiveCounts.read_all(tmp_path / "live") is None
    LiveCounts(2, 1).write(tmp_path / "live" / "process-0.json")
    LiveCounts(3, 0).write(tmp_path / "live" / "process-1.json")
    assert LiveCounts.read_all(tmp_path / "live") == LiveCounts(5, 1)
