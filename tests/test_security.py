"""Security defaults, each checked: servers bind 127.0.0.1 unless told otherwise; load and scrapes go
only to the host the user named; API keys reach vLLM and Locust through the environment and appear
nowhere in a run's files, its report or a command line; no shell; YAML loaded safely; every path a
run writes stays inside the results folder it was given."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

import fake_engine
from fake_openai import FakeConfig, FakeOpenAI
from proc_watch import TAG_ENV, GroupWatch, new_tag, tagged
from kvlab.errors import KvlabError

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SOURCES = sorted([*(REPO / "src").rglob("*.py"), *(REPO / "loadtest").rglob("*.py"), *(REPO / "bench").rglob("*.py"),
                  *TESTS.rglob("*.py")])


# ---------------------------------------------------------------------------------------------
# Servers bind 127.0.0.1 unless told otherwise


@pytest.mark.parametrize("engine, extra", [("vllm", []), ("vllm-cpu", []), ("sim", ["--gpu", "h100"])])
def test_every_engine_binds_127_0_0_1_by_default(kvlab, engine, extra):
    r = kvlab("serve", "llama-3.1-8b", "--engine", engine, *extra, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    argv = json.loads(r.stdout)["argv"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    r = kvlab("serve", "llama-3.1-8b", "--engine", engine, *extra, "--host", "0.0.0.0", "--dry-run", "--json")
    argv = json.loads(r.stdout)["argv"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"  # only when told


# ---------------------------------------------------------------------------------------------
# An experiment cell with an API key: the key works, is bound locally, and is written nowhere


@pytest.fixture(scope="module")
def keyed_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("keyed")
    key = "sk-kvlab-" + os.urandom(12).hex()
    spec = {"name": "keyed", "engine": "vllm-cpu", "models": ["llama-3.1-8b"], "workloads": ["agent-smoke"],
            "load": {"users": [2]}, "duration_s": 3, "warmup_s": "1s", "kv_memory_gib": 1, "max_model_len": 4096,
            "scrape_interval_s": 0.5}
    (work / "keyed.yaml").write_text(yaml.safe_dump(spec))
    tag = new_tag()
    env = {k: v for k, v in os.environ.items() if k not in ("KVLAB_API_KEY", "OPENAI_API_KEY", "VLLM_API_KEY")}
    env[TAG_ENV] = tag
    listening: dict[int, list] = {}
    with GroupWatch(tag) as watch:
        p = subprocess.Popen([sys.executable, str(TESTS / "fake_engine.py"), "experiment", "run",
                              str(work / "keyed.yaml"), "--out", str(work / "r"), "--api-key", key],
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while p.poll() is None:  # what every process of the run listens on, while it runs
            for q in tagged(tag):
                try:  # kept across samples: a later sample, as the server shuts down, sees nothing
                    seen = listening.setdefault(q.pid, [])
                    seen += [c.laddr for c in q.net_connections("inet")
                             if c.status == psutil.CONN_LISTEN and c.laddr not in seen]
                except psutil.Error:
                    pass
            watch.sample()
            try:
                p.wait(timeout=0.3)
            except subprocess.TimeoutExpired:
                pass
        stdout, stderr = p.communicate()
    rep = subprocess.run([sys.executable, "-m", "kvlab", "report", str(work / "r"), "--out", str(work / "report")],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    yield {"key": key, "rc": p.returncode, "stdout": stdout, "stderr": stderr, "out": work / "r",
           "report": work / "report", "report_run": rep, "listening": listening, "watch": watch, "tag": tag}
    for q in tagged(tag):
        q.kill()


def test_the_key_reaches_vllm_and_locust(keyed_run):
    assert keyed_run["rc"] == 0, keyed_run["stderr"][-2000:]
    [res] = list(keyed_run["out"].glob("*/repeat-1/results.json"))
    r = json.loads(res.read_text())
    # the fake, like vLLM with VLLM_API_KEY, answers 401 without the key: every request was let in
    assert r["status"] == "complete" and r["client"]["requests_ok"] >= 1 and r["client"]["errors"] == 0


def test_the_key_is_in_no_file_report_output_or_command_line(keyed_run):
    key = keyed_run["key"].encode()
    files = [f for folder in (keyed_run["out"], keyed_run["report"]) for f in folder.rglob("*") if f.is_file()]
    assert len(files) > 20 and any(f.name == "index.html" for f in files)
    assert [f for f in files if key in f.read_bytes()] == []
    assert keyed_run["report_run"].returncode == 0
    for text in (keyed_run["stdout"], keyed_run["stderr"], keyed_run["report_run"].stdout, keyed_run["report_run"].stderr):
        assert keyed_run["key"] not in text
    cmdlines = [cmd for _, cmd in keyed_run["watch"].seen.values()]
    assert any("fake_openai.py" in c for c in cmdlines) and any("locust" in c for c in cmdlines)
    assert [c for c in cmdlines if keyed_run["key"] in c and "fake_engine.py" not in c] == []  # only kvlab's own argv
    manifest = json.loads(next(keyed_run["out"].glob("*/repeat-1/manifest.json")).read_text())
    assert manifest["server_env"]["VLLM_API_KEY"] == "<redacted>"


def test_the_run_listens_on_127_0_0_1_only(keyed_run):
    addrs = [a for laddrs in keyed_run["listening"].values() for a in laddrs]
    assert addrs, "the server was never seen listening"
    assert {a.ip for a in addrs} == {"127.0.0.1"}


def test_serve_keeps_the_key_off_the_command_line(kvlab):
    key = "sk-kvlab-" + os.urandom(8).hex()
    for args in (["--api-key", key], ["--", "--api-key", key], ["--", f"--api-key={key}"]):
        r = kvlab("serve", "llama-3.1-8b", "--engine", "vllm", "--dry-run", "--json", *args)
        assert r.returncode == 0, r.stderr
        assert key not in r.stdout and key not in r.stderr
        d = json.loads(r.stdout)
        assert d["env"] == {"VLLM_API_KEY": "<redacted>"} and "--api-key" not in d["argv"]


# ---------------------------------------------------------------------------------------------
# Load and scrapes go only to the host the user named


def test_a_workload_endpoint_cannot_name_another_host(tmp_path):
    from kvlab.loadtest.workload import load_workload

    wl = yaml.safe_load((REPO / "loadtest" / "agent-smoke.yaml").read_text())
    for endpoint in ("http://198.51.100.7/v1/chat/completions", "//198.51.100.7/v1/chat/completions",
                     "v1/chat/completions", "https:/x"):
        wl["request"]["endpoint"] = endpoint
        (tmp_path / "w.yaml").write_text(yaml.safe_dump(wl))
        with pytest.raises(KvlabError, match=r"field request.endpoint: .*a path on --host"):
            load_workload(tmp_path / "w.yaml")


def test_a_redirect_to_another_host_is_not_followed_by_the_load(tmp_path):
    from kvlab.loadtest.runner import run_load

    wl = yaml.safe_load((REPO / "loadtest" / "agent-smoke.yaml").read_text())
    wl["load"]["max_requests"] = 6
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(wl))
    with FakeOpenAI() as other, FakeOpenAI(FakeConfig(redirect_to=None)) as named:
        other_port = other.port
        named.config.redirect_to = f"http://localhost:{other_port}"
        named.config.fault_when = lambda n, body: "redirect" if n > 4 else None  # after the calibration
        res = run_load(named.url, tmp_path / "w.yaml", users=1, duration_s=4, out_dir=tmp_path / "run")
        assert other.n == 0 and other.requests == []  # nothing reached the other host
    turns = res.requests().query("kind == 'turn'")
    redirected = turns[turns["status_code"] == 307]
    assert len(redirected) >= 1 and set(redirected["error_kind"]) == {"bad_response"}
    assert redirected["error_detail"].str.contains("not followed").all()


def test_a_metrics_redirect_to_another_host_is_a_gap(tmp_path):
    from kvlab.metrics.samples import GAP, SampleWriter, read_samples
    from kvlab.metrics.scraper import Scraper

    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        if request.url.path == "/metrics":  # vLLM's own redirect: followed
            return httpx.Response(307, headers={"location": "/metrics/"})
        return httpx.Response(307, headers={"location": "http://198.51.100.7:9/metrics"})

    s = Scraper("http://127.0.0.1:8500", tmp_path / "metrics.csv", gpu=False)
    s._writer = SampleWriter(tmp_path / "metrics.csv")
    s._client = httpx.Client(transport=httpx.MockTransport(handler))
    r = s.scrape_once()
    s._writer.close()
    assert asked == ["http://127.0.0.1:8500/metrics", "http://127.0.0.1:8500/metrics/"]
    assert r.error == "redirected to http://198.51.100.7:9/metrics: not followed (scrapes go only to 127.0.0.1:8500)"
    gaps = read_samples(tmp_path / "metrics.csv").query("name == @GAP")
    assert json.loads(gaps["labels"].iloc[0])["kind"] == "redirect"


# ---------------------------------------------------------------------------------------------
# No shell, safe YAML, nothing evaluated


def _calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    return func.id if isinstance(func, ast.Name) else "?"


def test_no_shell_anywhere():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            shell = [k for k in call.keywords if k.arg == "shell" and not (isinstance(k.value, ast.Constant)
                                                                           and k.value.value is False)]
            if shell or name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                                 "os.execl", "os.execlp", "os.spawnl"):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}: {name}")
    assert bad == []
    assert len(SOURCES) > 50  # the walk saw the code base


def test_yaml_is_loaded_safely_and_nothing_is_evaluated():
    bad = []
    for path in SOURCES:
        for call in _calls(path):
            name = _name(call.func)
            loader = [k for k in call.keywords if k.arg == "Loader"]
            unsafe_loader = loader and _name(loader[0].value) not in ("yaml.SafeLoader", "yaml.CSafeLoader", "SafeLoader")
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.full_load_all", "yaml.unsafe_load_all", "eval",
                        "exec", "pickle.load", "pickle.loads") or \
                    (name in ("yaml.load", "yaml.load_all") and (not loader or unsafe_loader)):
                bad.append(f"{path.relative_to(REPO)}:{call.lineno}: {name}")
    assert bad == []


def test_a_python_object_in_yaml_is_refused(tmp_path):
    from kvlab.experiments.spec import load_spec

    marker = tmp_path / "pwned"
    (tmp_path / "s.yaml").write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(KvlabError, match="not valid YAML"):
        load_spec(tmp_path / "s.yaml")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Output paths stay inside the results folder


def test_cell_ids_from_paths_and_hub_ids_stay_inside_the_results_folder(tmp_path, monkeypatch):
    from kvlab.experiments import index, runner
    from kvlab.experiments.spec import Cell, validate_spec

    model = tmp_path / "models" / "my-llama"  # a local model folder: legitimate, and absolute
    model.mkdir(parents=True)
    from kvlab.models.cards import card
    (model / "config.json").write_text(json.dumps(card("llama-3.1-8b").config))
    tag = new_tag()
    fake_engine.install(monkeypatch.setattr)
    monkeypatch.setenv(TAG_ENV, tag)
    monkeypatch.chdir(REPO)
    out = tmp_path / "results" / "r"
    spec = validate_spec({"name": "paths", "engine": "vllm-cpu", "models": [str(model), "../../escape", "org/Model"],
                          "workloads": ["agent-smoke"], "load": {"users": [1]}, "duration_s": 2, "warmup_s": 0,
                          "kv_memory_gib": 1, "max_model_len": 4096}, "spec")
    before = {p for p in tmp_path.rglob("*") if out not in p.parents}
    runner.run_spec(spec, out)
    after = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out and p not in out.parents}
    assert after - before == set()  # nothing written outside the results folder
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())
    rows = {r["model"]: r for r in index.query(out)}
    assert set(rows) == {str(model), "../../escape", "org/Model"}  # every cell in the index
    assert rows[str(model)]["status"] == "complete"
    assert rows["../../escape"]["status"] == rows["org/Model"]["status"] == "failed"
    assert Cell(str(model), "bf16", "agent-smoke", 1).cell_id.startswith("my-llama-")
    with pytest.raises(KvlabError, match="would lie outside the results folder"):
        runner.inside(out, out / ".." / "x")
    assert tagged(tag) == []


def test_experiment_one_names_its_folder_safely(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvlab", "experiment", "one", "--model", "../../x", "--quant", "fp8+fp8-kv",
                        "--engine", "vllm", "--duration", "1s", "--warmup", "0"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert "Traceback" not in r.stderr
    made = [p for p in tmp_path.rglob("run.json")]
    assert [p.relative_to(tmp_path).parts[:3] for p in made] == [("results", "one", "x-fp8_fp8-kv")]
    assert not (tmp_path.parent / "x").exists()
