"""Every file kvlab writes is a record written atomically through kvlab.io (temporary name, then
rename), or one of the few streams that are appended to by design and say when they are
unfinished. A new write anywhere else fails this audit until it is one or the other."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import kvlab.io as kio

SRC = Path(kio.__file__).resolve().parent

# (module, what it calls): why it is not a kvlab.io record write
STREAMS = {
    ("deploy/process.py", "open"): "the server's log, appended as the server writes it",
    ("metrics/samples.py", "open"): "metrics.csv: one flushed batch per scrape; a torn last row is skipped when read",
    ("loadtest/records.py", "open"): "requests-*.jsonl.part: one flushed line per request, renamed .jsonl when whole",
    ("loadtest/runner.py", "open"): "locust.out: Locust's console output",
    ("models/twins.py", "write_text"): "a twin is built in a temporary folder that is renamed whole",
    ("loadtest/records.py", "replace"): "os.replace: the finished .jsonl.part renamed .jsonl",
    ("experiments/ray_runner.py", "open"): "a Ray task's server log, appended to the folder's as each start appends",
    ("experiments/ray_runner.py", "replace"): "os.replace: a repeat folder from a Ray task, unpacked beside, moved in whole",
}
# calls that write through a path handed out by kvlab.io.atomic_path
THROUGH_ATOMIC_PATH = {("loadtest/records.py", "to_parquet"), ("analysis/report.py", "to_csv"),
                       ("experiments/index.py", "connect"), ("replay/run.py", "write_table"),
                       ("plan/rebound.py", "savefig")}
WRITERS = {"write_text", "write_bytes", "to_csv", "to_parquet", "to_json", "savefig", "dump", "connect",
           "copyfile", "copy", "copy2", "replace", "rename", "write_table"}


def _write_sites() -> set[tuple[str, str]]:
    sites = set()
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "io.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else "")
            if name == "open" and _opens_for_writing(node):
                sites.add((rel, "open"))
            elif name in WRITERS and not _harmless(rel, node):
                sites.add((rel, name))
    return sites


def _opens_for_writing(call: ast.Call) -> bool:
    modes = [a for a in call.args[1:2]] + [k.value for k in call.keywords if k.arg == "mode"]
    return any(isinstance(m, ast.Constant) and isinstance(m.value, str) and set(m.value) & set("wax+") for m in modes)


def _harmless(rel: str, call: ast.Call) -> bool:
    """Calls named like writers that write no file: str.replace, json.dumps' cousins, savefig to memory."""
    f = call.func
    owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
    if isinstance(f, ast.Name) and f.id in ("replace", "copy"):
        return True  # dataclasses.replace, copy.copy
    if isinstance(f, ast.Attribute) and f.attr == "replace" and owner != "os":
        return True  # str.replace, Path.replace on a temporary (checked where it matters: os.replace)
    if isinstance(f, ast.Attribute) and f.attr in ("copy", "copy2", "copyfile") and owner != "shutil":
        return True  # DataFrame.copy, dict.copy
    if isinstance(f, ast.Attribute) and f.attr == "dump" and isinstance(f.value, ast.Name) and f.value.id == "yaml":
        return not call.args[1:]  # yaml.dump(obj) returns text
    if isinstance(f, ast.Attribute) and f.attr == "savefig" and rel == "analysis/plots.py":
        return True  # into a BytesIO, embedded in the page
    if isinstance(f, ast.Attribute) and f.attr == "rename" and rel in ("experiments/runner.py", "models/twins.py"):
        return True  # folders set aside (.partial-*) or moved into place whole
    return False


def test_every_write_is_atomic_or_a_declared_stream():
    sites = _write_sites()
    assert sites == set(STREAMS) | THROUGH_ATOMIC_PATH, (
        f"new write sites: {sorted(sites - set(STREAMS) - THROUGH_ATOMIC_PATH)}; write records with kvlab.io "
        f"(write_json_atomic, write_text_atomic, atomic_path) or declare the stream here")


def test_only_one_atomic_json_helper():
    defs = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.FunctionDef) and ("atomic" in n.name or n.name == "_write_atomic")]
    assert sorted(set(defs)) == ["io.py"]


def test_interrupted_write_keeps_the_old_record_and_no_temporary(tmp_path):
    p = tmp_path / "status.json"
    kio.write_json_atomic(p, {"status": "running"})
    with pytest.raises(KeyboardInterrupt):
        with kio.atomic_path(p) as tmp:
            tmp.write_text('{"status": "comp')  # half written when Ctrl-C lands
            raise KeyboardInterrupt
    assert json.loads(p.read_text()) == {"status": "running"}
    assert [x.name for x in tmp_path.iterdir()] == ["status.json"]


def test_a_record_is_visible_only_whole(tmp_path):
    p = tmp_path / "results.json"
    big = {"rows": list(range(50_000))}
    with kio.atomic_path(p) as tmp:
        tmp.write_text(json.dumps(big))
        assert not p.exists()  # nothing at the record's name until the rename
    assert json.loads(p.read_text()) == big
