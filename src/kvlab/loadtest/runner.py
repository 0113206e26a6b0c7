"""Run Locust headless as a subprocess (never imported here: its gevent monkey-patching would break
the caller) and collect what it wrote: Locust's CSVs, the per-request records, a summary.

    out_dir/
      workload.yaml           the workload as run (shape override applied)
      locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv,
      locust.html, locust.log
      requests/               per-process JSONL records (kvlab.loadtest.records)
      requests.parquet        all records in one table
      load.json               command, paths, shape schedule and the measured summary
                              (kvlab.schema.load.LoadRecord: the run's one score, with its SLO),
                              how prompts were sized, each Locust process's CPU, warnings, failure

The client watches itself: every Locust process's CPU is sampled about once a second (psutil); a
process that streams (standalone or worker) busy at CLIENT_CPU_BUSY of a core or more (p90 of the
samples after the first CPU_WARMUP_S) measures latencies that may include its own queueing, and the
run says so (load.json `warnings`, `kvlab load`'s output, the experiment runner's progress).
A calibration that cannot fit stops the run (LoadFailed): nothing pretends to have measured.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import yaml

from kvlab import resources
from kvlab.errors import KvlabError
from kvlab.io import write_text_atomic
from kvlab.loadtest.records import LiveCounts, read_requests, record_files, write_parquet
from kvlab.loadtest.render import Calibration, CalibrationError
from kvlab.loadtest.shapes import SHAPES, ShapePlan
from kvlab.loadtest.workload import Workload, load_workload
from kvlab.ports import free_port
from kvlab.schema.load import LoadRecord
from kvlab.schema.slo import SLO, SLOFrom
from kvlab.units import parse_duration_s

STARTUP_GRACE_S = 60.0  # Locust start, worker connection, final CSV writing
WORKER_WAIT_S = 30
CLIENT_CPU_BUSY = 0.8  # of one core: above it, a Locust process queues its own users' reads
CPU_WARMUP_S = 3.0  # Locust's imports and the spawning of users: not the load
FATAL_GRACE_S = 5.0  # a process that stopped the run on a fatal error: the others get this long


class LoadFailed(KvlabError):
    """A run that stopped on an error retrying cannot cure (calibration that cannot fit). load.json
    is written with the failure; `result` holds what was recorded."""

    exit_code = 1

    def __init__(self, message: str, result: "LoadResult | None" = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class LoadResult:
    out_dir: Path
    command: list[str]
    returncode: int
    stats_csv: Path
    stats_history_csv: Path
    failures_csv: Path
    exceptions_csv: Path
    html_report: Path
    log_path: Path
    records_dir: Path
    records_path: Path  # requests.parquet
    summary: dict
    client_cpu: list[dict] = field(default_factory=list)  # kvlab.schema.load.ClientCPU
    warnings: list[str] = field(default_factory=list)
    prompt_sizing: dict | None = None  # kvlab.schema.load.PromptSizing

    def requests(self):
        """The per-request records as a DataFrame (kvlab.loadtest.records.read_requests)."""
        return read_requests(self.records_path)


@dataclass
class Progress:
    elapsed_s: float
    duration_s: float
    users: int | None  # Locust users running now (None until a process has said)
    requests: int  # turns ended (records written)
    failures: int
    ttft_p50_s: float | None
    in_flight: int | None = None  # turns sent and not ended yet (None until a process has said)


@dataclass
class _RecordTail:
    """Reads new complete lines of the record files while the run goes on."""

    folder: Path
    offsets: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    failures: int = 0
    ttfts: list[float] = field(default_factory=list)

    def poll(self) -> None:
        if not self.folder.is_dir():
            return
        for path in record_files(self.folder):
            key = path.name.removesuffix(".part")
            start = self.offsets.get(key, 0)
            with open(path, "rb") as fh:
                fh.seek(start)
                data = fh.read()
            end = data.rfind(b"\n") + 1
            self.offsets[key] = start + end
            for line in data[:end].splitlines():
                self._count(json.loads(line))

    def _count(self, rec: dict) -> None:
        if rec.get("kind") != "turn":
            return
        self.requests += 1
        if rec.get("error_kind"):
            self.failures += 1
        elif rec.get("ttft_s") is not None:
            self.ttfts.append(rec["ttft_s"])

    @property
    def ttft_p50_s(self) -> float | None:
        if not self.ttfts:
            return None
        s = sorted(self.ttfts)
        return s[len(s) // 2]


class _CPUWatch:
    """Each Locust process's CPU, sampled by the caller about once a second."""

    def __init__(self, procs: list[tuple[str, subprocess.Popen]]) -> None:
        self.t0 = time.monotonic()
        self.watched: list[tuple[str, int, psutil.Process | None]] = []
        for role, p in procs:
            try:
                self.watched.append((role, p.pid, psutil.Process(p.pid)))
            except psutil.Error:
                self.watched.append((role, p.pid, None))
        self.last: dict[int, tuple[float, float]] = {}
        self.samples: dict[int, list[float]] = {pid: [] for _, pid, _ in self.watched}

    def sample(self) -> None:
        now = time.monotonic()
        for _, pid, proc in self.watched:
            if proc is None:
                continue
            try:
                t = proc.cpu_times()
            except psutil.Error:  # exited
                continue
            cpu = t.user + t.system
            prev = self.last.get(pid)
            self.last[pid] = (now, cpu)
            if prev is not None and now - self.t0 >= CPU_WARMUP_S and now > prev[0]:
                self.samples[pid].append((cpu - prev[1]) / (now - prev[0]))

    def result(self) -> list[dict]:
        out = []
        for role, pid, _ in self.watched:
            xs = self.samples[pid]
            arr = np.asarray(xs, dtype=float)
            out.append({"source": "measured", "role": role, "pid": pid, "samples": len(xs),
                        "mean": round(float(arr.mean()), 3) if len(xs) else None,
                        "p90": round(float(np.percentile(arr, 90)), 3) if len(xs) else None,
                        "max": round(float(arr.max()), 3) if len(xs) else None,
                        "cpu_s": round(self.last.get(pid, (0.0, 0.0))[1], 3)})
        return out


def client_warnings(client_cpu: list[dict], workers: int, summary: dict) -> list[str]:
    """What the run should not be read without: a saturated client, no turn sent, every turn failed."""
    out = []
    streaming = [c for c in client_cpu if c["role"] != "master" and c["p90"] is not None]
    busy = [c for c in streaming if c["p90"] >= CLIENT_CPU_BUSY]
    if busy:
        worst = max(busy, key=lambda c: c["p90"])
        suggest = max(2, 2 * workers) if workers else max(2, min(os.cpu_count() or 2, 2 * len(busy) + 1))
        out.append(f"client CPU: Locust {worst['role']} process {worst['pid']} was busy {worst['p90']:.0%} of a core "
                   f"(p90 of {worst['samples']} one-second samples; {len(busy)} of {len(streaming)} streaming "
                   f"process(es) at or above {CLIENT_CPU_BUSY:.0%}): latencies may include client queueing; "
                   f"rerun with --workers N (Locust master and N worker processes), e.g. --workers {suggest}")
    if summary.get("requests", 0) == 0:
        out.append("no turn was sent: nothing was measured")
    elif summary.get("requests_ok", 0) == 0:
        out.append(f"every turn failed ({summary['requests']}): nothing was measured")
    return out


def _fatal_messages(records_dir: Path) -> list[str]:
    """What a Locust process wrote when it stopped the run (locustfile FATAL_FILE)."""
    if not records_dir.is_dir():
        return []
    return [p.read_text(errors="replace").strip() for p in sorted(records_dir.glob("fatal-*.txt"))]


def _sizing_args(calibrate: bool, tokenizer: str | Path | None, tokens_per_word: float | None,
                 wl: Workload) -> tuple[list[str], Calibration | None, str | None]:
    """Locust's arguments for prompt sizing, the sizing itself (None: calibrated on the server) and
    the tokenizer path it came from. The workload's `prompt_sizing:` applies where no argument does."""
    from kvlab.loadtest import sizing

    chosen = sizing.requested(calibrate, tokenizer, tokens_per_word, wl.prompt_sizing)
    if chosen is None:
        return [], None, None
    tokenizer, tokens_per_word = chosen
    if tokenizer:
        cal = sizing.from_tokenizer(tokenizer)  # here, once: a bad folder is one line before Locust starts
        args = ["--no-calibrate", "--tokens-per-word", repr(cal.tokens_per_word),
                "--kvlab-template-tokens", f"{cal.base_tokens!r},{cal.message_tokens!r}"]
        return args, cal, str(tokenizer)
    cal = sizing.from_tokens_per_word(float(tokens_per_word))  # type: ignore[arg-type]
    return ["--no-calibrate", "--tokens-per-word", repr(cal.tokens_per_word)], cal, None


def _calibrated_sizing(df) -> dict | None:
    """The calibration the Locust processes made, from their probe records (A, B, C)."""
    from kvlab.loadtest.sizing import prompt_sizing

    probes = df[(df["kind"] == "probe") & df["error_kind"].isna() & df["prompt_tokens"].notna()]
    counts = [probes.loc[probes["probe"] == k, "prompt_tokens"] for k in ("A", "B", "C")]
    if any(len(c) == 0 for c in counts):
        return None
    try:
        return prompt_sizing(Calibration.fit(*(int(c.iloc[0]) for c in counts)))
    except CalibrationError:
        return None


def parse_duration(text: str | float | int) -> float:
    """'90', '90s', '5m', '1h30m' (Locust's -t format; the grammar of kvlab.units) -> seconds."""
    return parse_duration_s(text, allow_zero=True, what="duration")


def _users_from_history(path: Path) -> int | None:
    """The last 'User Count' Locust wrote to its stats history (a CSV it flushes every few seconds;
    its last line may be cut off)."""
    import csv

    try:
        with open(path, "rb") as fh:
            header = next(csv.reader([fh.readline().decode(errors="replace")]))
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = fh.read().decode(errors="replace").split("\n")[:-1]  # complete lines only
        col = header.index("User Count")
        for row in csv.reader(reversed(lines)):
            if len(row) == len(header) and row[0] != "Timestamp":
                return int(row[col])
        return None
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _resolve_workload(workload: str | Path | Workload, shape: str | None) -> Workload:
    if shape is not None and shape not in SHAPES:
        raise KvlabError(f"shape {shape!r}: use one of {', '.join(SHAPES)}")
    wl = workload if isinstance(workload, Workload) else load_workload(workload)
    return wl.with_shape(shape)  # type: ignore[arg-type]


def _stop(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def run_load(host: str, workload: str | Path | Workload, users: int | None = None, duration_s: float | str | None = None,
             shape: str | None = None, out_dir: str | Path | None = None, seed: int = 0, *,
             workers: int = 0, max_requests: int | None = None, spawn_rate: float | None = None,
             stop_timeout_s: float = 10.0, locustfile: str | Path | None = None,
             progress: Callable[[Progress], None] | None = None, progress_every_s: float = 1.0,
             api_key: str | None = None, slo: SLO | None = None, slo_from: SLOFrom = "workload",
             calibrate: bool = True, tokenizer: str | Path | None = None,
             tokens_per_word: float | None = None) -> LoadResult:
    """Play `workload` against `host` (e.g. http://127.0.0.1:8000) with Locust, headless.

    users: peak Locust users (poisson: session slots); duration_s: run time (seconds or '60s');
    shape: constant | steps | poisson | diurnal (default: the workload's); workers: 0 = one Locust
    process, N = a master and N local workers. Bounded: Locust stops at the run time or after
    max_requests, in-flight requests get stop_timeout_s to finish, and a run that overstays is
    killed (its records are kept). An API key (api_key, else KVLAB_API_KEY or OPENAI_API_KEY in the
    environment) reaches the locustfile through its environment, never on a command line. The run
    is scored once, against `slo` (default: the workload's), and load.json says whose it was.

    Prompts are sized by calibration on the server's usage (probes), or with calibrate=False from
    a local `tokenizer` folder or a stated `tokens_per_word` (the workload's `prompt_sizing:` where
    none is given). A calibration that cannot fit raises LoadFailed (load.json says why)."""
    wl = _resolve_workload(workload, shape)
    sizing_args, sizing_cal, sizing_tokenizer = _sizing_args(calibrate, tokenizer, tokens_per_word, wl)
    users = users or wl.load.users
    duration = parse_duration(duration_s) if duration_s is not None else wl.load.duration_s
    if users < 1 or duration <= 0:
        raise KvlabError("users must be >= 1 and the duration > 0")
    out = Path(out_dir) if out_dir else Path("results") / "load" / f"{wl.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "load.json").exists() or (out / "requests").exists():
        raise KvlabError(f"{out} already holds a load run: give a new --out folder (nothing is overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    wl_path = out / "workload.yaml"
    write_text_atomic(wl_path, yaml.safe_dump(wl.model_dump(mode="json"), sort_keys=False))
    records_dir = out / "requests"
    lf = Path(locustfile) if locustfile else resources.locustfile()

    live_dir = out / "live"  # the processes' users and turns in flight, for the progress; deleted after
    live_dir.mkdir(exist_ok=True)
    common = ["-f", str(lf), "--workload", str(wl_path), "--seed", str(seed), "--records", str(records_dir),
              "--kvlab-live", str(live_dir), *sizing_args]
    if max_requests or wl.load.max_requests:
        common += ["--max-requests", str(max_requests or wl.load.max_requests)]
    head = [sys.executable, "-m", "locust", *common, "--host", host, "--headless", "-u", str(users),
            "-r", str(spawn_rate or wl.load.spawn_rate or max(users, 1)), "-t", f"{int(round(duration))}s",
            "--csv", str(out / "locust"), "--html", str(out / "locust.html"), "--only-summary",
            "--exit-code-on-error", "0", "--stop-timeout", f"{stop_timeout_s:g}",
            "--logfile", str(out / "locust.log")]
    worker_cmds: list[list[str]] = []
    if workers > 0:
        port = free_port()
        head += ["--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                 "--expect-workers", str(workers), "--expect-workers-max-wait", str(WORKER_WAIT_S)]
        worker_cmds = [[sys.executable, "-m", "locust", *common, "--worker", "--master-host", "127.0.0.1",
                        "--master-port", str(port), "--logfile", str(out / f"locust-worker{i}.log")] for i in range(workers)]

    log_path = out / "locust.out"
    env = {**os.environ, "KVLAB_API_KEY": api_key} if api_key else None  # None: inherit ours
    procs: list[subprocess.Popen] = []
    tail = _RecordTail(records_dir)
    deadline = time.monotonic() + duration + stop_timeout_s + STARTUP_GRACE_S
    t_start = time.monotonic()
    fatal_at: float | None = None
    with open(log_path, "wb") as log:
        try:
            procs.append(subprocess.Popen(head, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env))
            for cmd in worker_cmds:
                procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                              env=env))
            cpu = _CPUWatch([("master" if workers else "standalone", procs[0]),
                             *(("worker", p) for p in procs[1:])])
            cpu.sample()
            while procs[0].poll() is None:
                if time.monotonic() > deadline:
                    _stop(procs, signal.SIGTERM)
                    time.sleep(2)
                    _stop(procs, signal.SIGKILL)
                    break
                time.sleep(min(progress_every_s, 1.0))
                cpu.sample()
                if fatal_at is None and _fatal_messages(records_dir):
                    fatal_at = time.monotonic()  # the process that wrote it quits; the others are stopped
                elif fatal_at is not None and time.monotonic() - fatal_at > FATAL_GRACE_S:
                    _stop(procs, signal.SIGTERM)
                if progress is not None:
                    tail.poll()
                    live = LiveCounts.read_all(live_dir)
                    users = live.users if live else _users_from_history(out / "locust_stats_history.csv")
                    progress(Progress(time.monotonic() - t_start, duration, users, tail.requests, tail.failures,
                                      tail.ttft_p50_s, live.in_flight if live else None))
            for p in procs[1:]:
                try:
                    p.wait(timeout=stop_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    _stop([p], signal.SIGKILL)
        except BaseException:
            # Ctrl-C or an error here: stop Locust (it writes its CSVs on SIGTERM), keep the records.
            _stop(procs, signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=stop_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    _stop([p], signal.SIGKILL)
            raise
        finally:
            shutil.rmtree(live_dir, ignore_errors=True)
    returncode = procs[0].wait()
    scored_by = (slo, slo_from) if slo is not None else (wl.slo, "workload")
    from kvlab.loadtest.sizing import prompt_sizing

    sizing = prompt_sizing(sizing_cal, sizing_tokenizer) if sizing_cal is not None else None
    return _collect(out, wl, head, returncode, records_dir, log_path, users, duration, workers, scored_by,
                    cpu.result(), sizing)


def _collect(out: Path, wl: Workload, command: list[str], returncode: int, records_dir: Path, log_path: Path,
             users: int, duration: float, workers: int, scored_by: tuple[SLO, SLOFrom],
             client_cpu: list[dict] | None = None, sizing: dict | None = None) -> LoadResult:
    from kvlab.loadtest.summary import summarize

    client_cpu = client_cpu or []
    fatal = _fatal_messages(records_dir)
    if not records_dir.is_dir() or not record_files(records_dir):
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise KvlabError(f"Locust wrote no request records (exit code {returncode}); see {log_path}: "
                         + (" | ".join(tail) or "(no output)"))
    df = read_requests(records_dir)
    records_path = write_parquet(df, out / "requests.parquet")
    summary = summarize(df, scored_by[0], slo_from=scored_by[1])
    if sizing is None:
        sizing = _calibrated_sizing(df)
    warnings = client_warnings(client_cpu, workers, summary)
    streaming = [c["p90"] for c in client_cpu if c["role"] != "master" and c["p90"] is not None]
    summary.update(client_cpu_busiest=max(streaming) if streaming else None, warnings=warnings)
    result = LoadResult(
        out_dir=out, command=command, returncode=returncode,
        stats_csv=out / "locust_stats.csv", stats_history_csv=out / "locust_stats_history.csv",
        failures_csv=out / "locust_failures.csv", exceptions_csv=out / "locust_exceptions.csv",
        html_report=out / "locust.html", log_path=log_path, records_path=records_path, records_dir=records_dir,
        summary=summary, client_cpu=client_cpu, warnings=warnings, prompt_sizing=sizing)
    plan = ShapePlan(wl.load.shape, users, duration)
    failure = fatal[0] if fatal else None
    LoadRecord(command=command, returncode=returncode, workload=wl.name, shape=wl.load.shape.kind,
               users=users, duration_s=duration, workers=workers,
               shape_schedule=[{"offset_s": t, "users": u} for t, u in plan.schedule()],
               first_request_ts=float(df["start_ts"].min()) if len(df) else None,
               paths={k: str(v) for k, v in result.__dict__.items() if isinstance(v, Path)},
               summary=summary, prompt_sizing=sizing if not failure else None, client_cpu=client_cpu,
               warnings=warnings, failure=failure).write(out / "load.json")
    if failure:
        raise LoadFailed(failure, result)
    return result

