"""The scraper against a local HTTP server that plays back expositions (the real 0.32 fixture,
edited copies of it, an error status, garbage), GPU telemetry, and the CLI."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kvlab.errors import KvlabError
from kvlab.metrics.figures import summarize
from kvlab.metrics.gpu import NvidiaSmi, parse_query_csv
from kvlab.metrics.samples import GAP, GPU_ABSENT, read_samples
from kvlab.metrics.scraper import Scraper, metrics_url, redacted

FIXTURES = Path(__file__).parent / "fixtures"
REAL = (FIXTURES / "vllm-0.32-cpu-deepseek-twin.metrics.txt").read_text()
GEN = 'vllm:generation_tokens_total{engine="0",model_name="deepseek-v2-lite"} '


def with_generated(n: float) -> str:
    return REAL.replace(GEN + "8.0", GEN + f"{n:.1f}")


class Playback:
    """Serves a list of (status, body) in order, then repeats the last one."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.served = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                status, body = outer.responses[min(outer.served, len(outer.responses) - 1)]
                outer.served += 1
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def playback():
    servers = []

    def make(responses):
        servers.append(Playback(responses))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


@pytest.fixture(autouse=True)
def no_nvidia_smi(monkeypatch, tmp_path):
    """This machine has no GPU; make sure no test finds a real nvidia-smi either."""
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "nvidia-smi").exists()))


def test_scrapes_record_samples_gaps_and_a_restart(playback, tmp_path):
    srv = playback([(200, with_generated(8)), (200, with_generated(20)), (500, "engine dead"),
                    (200, "<html>not metrics</html>"), (200, "process_open_fds 3.0\n"),
                    (200, with_generated(5)), (200, with_generated(11))])
    with Scraper(srv.url, tmp_path / "metrics.csv", interval_s=3600) as s:
        results = [s.scrape_once() for _ in range(5)]
    # entering scraped once, each call once, leaving once more: 7 scrapes, 3 of them failed
    assert (s.scrapes, s.gaps) == (7, 3)
    assert [r.error for r in results[:4]] == [None, "HTTP 500", "untyped lines: invalid metric name:<html>not metrics</html>",
                                              "no vllm:* samples in the response"]
    assert results[0].samples == 374
    df = read_samples(tmp_path)
    gaps = df[df["name"] == GAP]
    assert [json.loads(lab)["kind"] for lab in gaps["labels"]] == ["http_status", "parse", "no_samples"]
    assert all(json.loads(lab)["url"] == srv.url + "/metrics" for lab in gaps["labels"])
    assert (df["name"] == GPU_ABSENT).sum() == 1
    gen = df[df["name"] == "vllm:generation_tokens_total"]["value"].tolist()
    assert gen == [8, 20, 5, 11]  # restart between the 2nd and 3rd good scrape
    f = summarize(tmp_path)
    assert f.generation_tokens == 12 + 5 + 6 and f.counter_resets == 1
    assert (f.scrapes, f.scrape_gaps) == (4, 3)
    assert f.kv_cache_size_tokens == 34512 and f.num_gpu_blocks == 2157


def test_a_partly_garbled_exposition_keeps_the_good_families(playback, tmp_path):
    bad = REAL.replace('vllm:kv_cache_usage_perc{engine="0",model_name="deepseek-v2-lite"} 0.0',
                       'vllm:kv_cache_usage_perc{engine="0",model_name="deepseek-v2-lite"} ???')
    srv = playback([(200, bad)])
    with Scraper(srv.url, tmp_path / "m.csv", interval_s=3600) as s:
        pass
    df = read_samples(tmp_path / "m.csv")
    gap = json.loads(df[df["name"] == GAP]["labels"].iloc[0])
    assert gap["kind"] == "parse" and gap["error"].startswith("vllm:kv_cache_usage_perc")
    assert (df["name"] == "vllm:prompt_tokens_total").sum() == 2
    assert (df["name"] == "vllm:kv_cache_usage_perc").sum() == 0
    assert s.gaps == 2


def test_unreachable_endpoint_is_recorded_not_raised(tmp_path):
    with Scraper("http://127.0.0.1:1", tmp_path / "m.csv", interval_s=3600, timeout_s=1) as s:
        pass
    assert (s.scrapes, s.gaps) == (2, 2) and "ConnectError" in s.last_error
    df = read_samples(tmp_path / "m.csv")
    assert [json.loads(x)["kind"] for x in df[df["name"] == GAP]["labels"]] == ["unreachable"] * 2


def test_the_thread_polls_until_stopped(playback, tmp_path):
    srv = playback([(200, REAL)])
    with Scraper(srv.url, tmp_path / "m.csv", interval_s=0.05) as s:
        deadline = time.monotonic() + 30
        while s.scrapes < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    n = s.scrapes
    assert n >= 5  # at least 4 while running, and the one at the exit
    time.sleep(0.2)
    assert s.scrapes == n and srv.served == n  # nothing after the exit
    ts = read_samples(tmp_path / "m.csv")["ts"].unique()
    assert len(ts) == n + 1  # the scrape times and the GPU-absent row


def test_a_write_failure_stops_the_thread_and_is_reported(playback, tmp_path, monkeypatch):
    srv = playback([(200, REAL)])
    s = Scraper(srv.url, tmp_path / "m.csv", interval_s=0.05)
    with pytest.raises(KvlabError, match="stopped early: OSError.*No space left"):
        with s:
            def full(rows):
                raise OSError(28, "No space left on device")
            monkeypatch.setattr(s._writer, "append", full)
            deadline = time.monotonic() + 30
            while s._failure is None and time.monotonic() < deadline:
                time.sleep(0.02)
    assert len(read_samples(tmp_path / "m.csv")) > 374  # the first scrape was kept


def test_urls():
    assert metrics_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/metrics"
    assert metrics_url("http://h:1/custom/metrics") == "http://h:1/custom/metrics"
    assert redacted("http://user:secret@h:1/metrics") == "http://h:1/metrics"
    for bad in ("127.0.0.1:8000", "ftp://h/metrics", "", "http://"):
        with pytest.raises(KvlabError):
            metrics_url(bad)
    with pytest.raises(KvlabError, match="positive"):
        Scraper("http://h:1", "x.csv", interval_s=0)


# ---------------------------------------------------------------------------------------------
# GPU telemetry

NVIDIA_SMI_CSV = ("0, GPU-5c4f1b6e-0000-0000-0000-000000000000, NVIDIA H100 80GB HBM3, 61234, 81559, 87, 512.34\n"
                  "1, GPU-5c4f1b6e-0000-0000-0000-000000000001, NVIDIA H100 80GB HBM3, 1024, 81559, [N/A], [N/A]\n")


def test_parse_nvidia_smi_query_output():
    g0, g1 = parse_query_csv(NVIDIA_SMI_CSV)
    assert (g0.index, g0.name) == ("0", "NVIDIA H100 80GB HBM3")
    assert g0.values == {"memory.used": 61234, "memory.total": 81559, "utilization.gpu": 87, "power.draw": 512.34}
    assert g1.values == {"memory.used": 1024, "memory.total": 81559}
    with pytest.raises(ValueError):
        parse_query_csv("0, only, three")


def _fake_nvidia_smi(folder: Path, body: str, rc: int = 0) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{body}EOF\nexit {rc}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_gpu_rows_beside_each_scrape(playback, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_nvidia_smi(bin_dir, NVIDIA_SMI_CSV)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    srv = playback([(200, REAL)])
    with Scraper(srv.url, tmp_path / "m.csv", interval_s=3600):
        pass
    df = read_samples(tmp_path / "m.csv")
    mem = df[df["name"] == "nvidia_smi_memory_used_bytes"]
    assert len(mem) == 4 and set(mem["value"]) == {61234 * 2**20, 1024 * 2**20}
    assert (df["name"] == "nvidia_smi_power_draw_watts").sum() == 2  # GPU 1 reports [N/A]
    f = summarize(tmp_path / "m.csv")
    assert f.gpu_count == 2 and f.gpu_memory_used_peak_gib == pytest.approx((61234 + 1024) / 1024)
    assert f.gpu_power_mean_w == pytest.approx(512.34)


def test_failing_nvidia_smi_is_a_gpu_gap(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed\n", rc=9)
    smi = NvidiaSmi(str(tmp_path / "nvidia-smi"))
    with pytest.raises(RuntimeError, match="exited 9"):
        smi.sample(0.0)
    assert NvidiaSmi(str(tmp_path / "absent")).available  # a given path is trusted until it fails


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_scrape_then_summarize(kvlab, playback, tmp_path):
    srv = playback([(200, with_generated(8)), (200, with_generated(48))])
    out = tmp_path / "run"
    r = kvlab("scrape", srv.url, "--duration", "0.5s", "--interval", "0.1s", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    assert figures["model_name"] == "deepseek-v2-lite"
    assert figures["generation_tokens"] == 40
    assert figures["kv_cache_size_tokens"] == 34512
    assert json.loads((out / "metrics-summary.json").read_text())["figures"]["deepseek-v2-lite"]["generation_tokens"] == 40
    r = kvlab("metrics", "summarize", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["generation_tokens"] == 40
    r = kvlab("metrics", "summarize", str(out))
    assert r.returncode == 0 and "deepseek-v2-lite" in r.stdout and "34,512" in r.stdout


def test_cli_bad_input_is_one_line(kvlab, tmp_path):
    for args, msg in ((("scrape", "not a url", "--out", str(tmp_path)), "not an http(s) URL"),
                      (("scrape", "http://127.0.0.1:1", "--duration", "ten", "--out", str(tmp_path)), "not a duration"),
                      (("scrape", "http://127.0.0.1:1", "--duration", "0.3s", "--interval", "0.1s", "--out", str(tmp_path / "x")),
                       "scrapes of http://127.0.0.1:1/metrics failed"),
                      (("metrics", "summarize", str(tmp_path / "nothing")), "no samples file"),
                      (("metrics", "summarize-prometheus", "http://127.0.0.1:1", "--start-ts", "1", "--end-ts", "2"),
                       "cannot reach Prometheus")):
        r = kvlab(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("kvlab: error:") and msg in r.stderr and "Traceback" not in r.stderr
    # the failed scrape still left its gap rows
    assert (tmp_path / "x" / "metrics.csv").read_text().count(GAP) >= 2
