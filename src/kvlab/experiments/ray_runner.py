"""Run a spec on a Ray cluster (`kvlab experiment run SPEC --ray [ADDRESS]`): each server group
(model x level, the cells that share a server) is one Ray task asking for the GPUs its server needs
(tensor x pipeline size; a custom resource, `kvlab_gpu`, stands in where the cluster has no GPUs)
and a CPU for Locust, on whichever node has them, all in parallel.

A task runs its group exactly as the local runner does (`runner.run_server_group`) into a scratch
folder on its node, and sends each finished repeat's folder back whole (a tar through Ray's object
store, via a queue actor) as soon as it is written; the driver installs it in the results folder
atomically (unpacked beside it, then renamed into place, an unfinished one set aside as
`.partial-*`), finalizes the cells and rebuilds the SQLite index. Resume is the local runner's:
only pending repeats are sent. A worker or node that dies mid-task: the repeats of its group that
did not come back are failed with the reason, a clean-up task on that node stops what it left
running (the server's lease, Locust by its scratch folder), the other groups go on, and a rerun
redoes only those. Ctrl-C cancels the tasks (each stops its server and Locust) and keeps what came
back.

Secrets: an API key never travels as a task argument. A cluster kvlab starts inherits it from
kvlab's environment (KVLAB_API_KEY); on a cluster started with `ray start`, each node must have it
in the environment `ray start` ran with. A cluster kvlab starts has no dashboard or job server.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import tarfile
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from kvlab.errors import KvlabError
from kvlab.experiments import runner
from kvlab.experiments.spec import Cell, Spec

RAY_EXTRA = "--ray needs Ray, an optional extra: pip install 'kvlab[ray]'"
GPU_STAND_IN = "kvlab_gpu"  # the custom resource that stands in for GPUs on nodes without any
KEY_ENV = "KVLAB_API_KEY"  # where a task finds the servers' key: its node's environment
LOCUST_CPUS = 1
CANCEL_WAIT_S = 60.0  # after Ctrl-C: how long the tasks get to stop their servers
CLEANUP_WAIT_S = 60.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise KvlabError(RAY_EXTRA) from None
    return ray


def scratch_root() -> Path:
    """Where a task's group runs on its node before its records travel to the driver."""
    return Path(tempfile.gettempdir()) / "kvlab-ray"


# ---------------------------------------------------------------------------------------------
# On a node


def run_group_task(task: dict, sink: Any) -> dict:
    """One server group on this node (a Ray task): runner.run_server_group into a scratch folder,
    each finished repeat put on `sink` whole; returns the server log."""
    import ray

    spec = Spec.model_validate(task["spec"])
    group = [(Cell(**c), k) for c, k in task["cells"]]
    scratch = scratch_root() / task["scratch"]
    scratch.mkdir(parents=True, exist_ok=True)
    i = task["group"]
    sink.put((i, "group_start", {"node_id": ray.get_runtime_context().get_node_id(), "node": socket.gethostname(),
                                  "pid": os.getpid(), "scratch": str(scratch)}))
    api_key = os.environ.get(KEY_ENV) if task["keyed"] else None
    if task["keyed"] and not api_key:
        raise KvlabError(f"the run has an API key but this node's environment has no {KEY_ENV}: "
                         f"export it where `ray start` runs on every node")

    sent: set[tuple[str, int]] = set()

    def send(cell: Cell, k: int) -> None:
        rdir = runner.repeat_dir(scratch, cell, k)
        if (cell.cell_id, k) not in sent and rdir.is_dir():
            sink.put((i, "records", {"cell": cell.cell_id, "repeat": k, "tar": _pack(rdir)}))
            sent.add((cell.cell_id, k))

    def emit(kind: str, data: dict) -> None:
        if kind == "repeat_done":  # its records first, whole
            send(Cell(**_cell(group, data["cell"])), data["repeat"])
        sink.put((i, kind, data))

    # Ray's worker blocks SIGINT, and a child inherits the mask: the server would not hear the
    # SIGINT it is stopped with (vLLM shuts its engine core down on it). Ray cancels a task without it.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    try:
        runner.run_server_group(spec, scratch, group, task["engine"], task["engine_reason"], emit, api_key,
                                lambda cell: sink.put((i, "cell_done", {"cell": cell.cell_id})))
        log = scratch / f"{group[0][0].server_id}.server.log"
        return {"server_log": log.read_text(errors="replace") if log.exists() else ""}
    except BaseException:  # Ctrl-C (the task cancelled): what the interrupted repeat recorded is kept, as locally
        for cell, k in group:
            send(cell, k)
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        shutil.rmtree(scratch, ignore_errors=True)


def _cell(group: list[tuple[Cell, int]], cell_id: str) -> dict:
    return next(asdict(c) for c, _ in group if c.cell_id == cell_id)


def _pack(rdir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(rdir, arcname=rdir.name)
    return buf.getvalue()


def cleanup_task(scratch_name: str) -> list[str]:
    """On the node of a task that died: stop its server (by its lease) and its Locust (by its
    scratch folder on the command line), remove the scratch folder; what was stopped."""
    import psutil

    from kvlab.deploy.process import stop_leftover

    scratch = scratch_root() / scratch_name
    stopped = [w for lease in sorted(scratch.glob(".*.server.lease")) if (w := stop_leftover(lease))]
    groups = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(scratch) in a for a in p.info["cmdline"] or []):
                groups.add(os.getpgid(p.pid))
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for pgid in sorted(groups - {os.getpgid(0)}):
        try:
            os.killpg(pgid, signal.SIGKILL)  # Locust's own group (started with a new session)
            stopped.append(f"process group {pgid} (Locust, {scratch})")
        except (ProcessLookupError, PermissionError):
            continue
    shutil.rmtree(scratch, ignore_errors=True)
    return stopped


# ---------------------------------------------------------------------------------------------
# On the driver


def run_spec_on_ray(spec: Spec, out: Path, only: dict[str, str] | None = None, engine: str | None = None,
                    on_event: Callable[[str, dict], None] | None = None, api_key: str | None = None,
                    address: str | None = None) -> Path:
    """The local runner's run_spec, each server group a Ray task. address: a cluster to join
    (`auto`, `ray://...`, HOST:PORT); None: $RAY_ADDRESS, else a cluster on this machine that kvlab
    starts (and stops). A process that already called ray.init() is used as it is."""
    ray = import_ray()
    out = Path(out)
    emit = on_event or (lambda kind, data: None)
    plan = runner.plan_run(spec, out, only, engine, emit)
    done_cells: set[str] = set()
    try:
        if plan.groups:
            needs = _gpus_needed(spec, plan)
            with _cluster(ray, address, api_key, needs, emit) as cluster:
                _Driver(ray, spec, out, plan, emit, api_key is not None, done_cells).run(needs, cluster.gpu_resource)
    except BaseException:
        runner._finalize_rest(out, spec, plan.work, done_cells)
        raise
    runner._finalize_rest(out, spec, plan.work, done_cells)
    return out


def _gpus_needed(spec: Spec, plan: runner.RunPlan) -> list[int]:
    """Per server group: the GPUs its server takes (tensor x pipeline size; 0 for a server kvlab
    does not start)."""
    from kvlab import deploy
    from kvlab.deploy.engines import engine_class

    cls = engine_class(plan.engine)
    needs = []
    for group in plan.groups:
        cell = group[0][0]
        if not cls.launched_by_kvlab:
            needs.append(0)
            continue
        server = cls.open_server(deploy.ServeSpec(model=cell.model, quant=cell.quant, engine=plan.engine, gpu=spec.gpu,
                                                  kv_memory_gib=spec.kv_memory_gib, max_model_len=spec.max_model_len,
                                                  extra_args=list(spec.serve_args)))
        needs.append(server.config.tensor_parallel_size * server.config.pipeline_parallel_size)
    return needs


class _cluster:
    """Joined (address, $RAY_ADDRESS), already initialized, or started here on 127.0.0.1 with no
    dashboard; shut down on leaving only when kvlab started or joined it."""

    def __init__(self, ray: Any, address: str | None, api_key: str | None, needs: list[int],
                 emit: Callable[[str, dict], None]):
        self.ray, self.address, self.api_key, self.needs, self.emit = ray, address, api_key, needs, emit
        self.owned = False

    def __enter__(self) -> "_cluster":
        ray = self.ray
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS")
            if self.api_key:  # through the environment (inherited by the raylet kvlab starts), never an argument
                os.environ[KEY_ENV] = self.api_key
            kw: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if address:
                try:
                    ray.init(address=address, **kw)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    raise KvlabError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
            else:
                ray.init(address="local", _node_ip_address="127.0.0.1", resources={GPU_STAND_IN: sum(self.needs) or 1},
                         **kw)
            self.owned = True
        have = ray.cluster_resources()
        where = "GPU" if have.get("GPU", 0) > 0 else GPU_STAND_IN
        if max(self.needs) > have.get(where, 0):
            raise KvlabError(f"the Ray cluster has {have.get(where, 0):g} {where} in all; a server group needs "
                             f"{max(self.needs)} (tensor x pipeline size): start nodes with --num-gpus, or "
                             f"--resources '{{\"{GPU_STAND_IN}\": N}}' where none exist")
        self.gpu_resource = where
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.emit("cluster", {"nodes": len(nodes), "gpus": have.get(where, 0), "resource": where,
                              "cpus": have.get("CPU", 0)})
        return self

    def __exit__(self, *exc) -> None:
        if self.owned:
            self.ray.shutdown()


class _Driver:
    """Submits one task per server group, installs the records they send, fails the repeats of a
    task that died, and cancels them all on Ctrl-C."""

    def __init__(self, ray: Any, spec: Spec, out: Path, plan: runner.RunPlan, emit: Callable[[str, dict], None],
                 keyed: bool, done_cells: set[str]):
        from ray.util.queue import Queue

        self.ray, self.spec, self.out, self.plan, self.emit = ray, spec, out, plan, emit
        self.keyed, self.done_cells = keyed, done_cells
        self.sink = Queue()
        self.nodes: dict[int, str] = {}  # group -> node id, once the task said where it runs
        self.landed: dict[int, set[tuple[str, int]]] = {i: set() for i in range(len(plan.groups))}

    def run(self, needs: list[int], resource: str) -> None:
        ray = self.ray
        remote = ray.remote(run_group_task)
        refs: dict[Any, int] = {}
        scratch: dict[int, str] = {}
        for i, group in enumerate(self.plan.groups):
            scratch[i] = f"{self.spec.digest}-{group[0][0].server_id}-{uuid.uuid4().hex[:8]}"
            gpus = {"num_gpus": needs[i]} if resource == "GPU" else {"resources": {GPU_STAND_IN: needs[i]}} if needs[i] else {}
            task = {"group": i, "spec": self.spec.model_dump(), "cells": [(asdict(c), k) for c, k in group],
                    "engine": self.plan.engine, "engine_reason": self.plan.engine_reason, "scratch": scratch[i],
                    "keyed": self.keyed}
            opts = dict(num_cpus=LOCUST_CPUS, max_retries=0, retry_exceptions=False, name=f"kvlab {group[0][0].server_id}",
                        **gpus)
            refs[remote.options(**opts).remote(task, self.sink)] = i
            self.emit("group_queued", {"group": i, "model": group[0][0].model, "quant": group[0][0].quant,
                                       "repeats": len(group), "gpus": needs[i]})
        self.scratch = scratch
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)
                self._drain()
                for ref in ready:
                    self._finished(refs.pop(ref), ref)
        except BaseException:
            self._cancel(refs)
            raise

    def _drain(self) -> None:
        while True:
            items = self.sink.get_nowait_batch(self.sink.qsize())
            if not items:
                return
            for i, kind, data in items:
                self._event(i, kind, data)

    def _event(self, i: int, kind: str, data: dict) -> None:
        group = self.plan.groups[i]
        if kind == "records":
            cell = next(c for c, _ in group if c.cell_id == data["cell"])
            install_repeat(self.out, cell, data["repeat"], data["tar"])
            self.landed[i].add((data["cell"], data["repeat"]))
        elif kind == "cell_done":
            cell = next(c for c, _ in group if c.cell_id == data["cell"])
            runner.finalize_cell(self.out, cell, self.spec)
            self.done_cells.add(cell.cell_id)
        else:
            if kind == "group_start":
                self.nodes[i] = data["node_id"]
                data = {**data, "model": group[0][0].model, "quant": group[0][0].quant, "repeats": len(group)}
            self.emit(kind, {**data, "group": i})

    def _finished(self, i: int, ref: Any) -> None:
        """A task ended: its log appended to the folder's; if it failed, the repeats it did not send are failed."""
        group = self.plan.groups[i]
        try:
            result = self.ray.get(ref)
        except Exception as e:  # the task raised, its worker or node died
            self._drain()
            why = _task_failure(e, self.nodes.get(i))
            for cell, k in group:
                if (cell.cell_id, k) not in self.landed[i]:
                    runner.fail_repeat(self.out, cell, k, why, [], self.plan.engine)
                    self.emit("repeat_done", {"cell": cell.cell_id, "repeat": k, "status": "failed", "reason": why,
                                              "group": i})
            for cell in {c for c, _ in group}:
                runner.finalize_cell(self.out, cell, self.spec)
                self.done_cells.add(cell.cell_id)
            self._clean_up(i)
        else:
            log = runner.inside(self.out, self.out / f"{group[0][0].server_id}.server.log")
            with open(log, "a") as f:
                f.write(result["server_log"])
        self.emit("group_done", {"group": i})

    def _clean_up(self, i: int) -> None:
        """What the dead task left on its node: stopped by a task pinned there (if the node lives)."""
        node = self.nodes.get(i)
        if node is None:
            return
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
        ref = self.ray.remote(cleanup_task).options(num_cpus=0, max_retries=0, scheduling_strategy=strategy).remote(
            self.scratch[i])
        try:
            for what in self.ray.get(ref, timeout=CLEANUP_WAIT_S):
                self.emit("leftover", {"stopped": what})
        except Exception as e:  # the node is gone with what ran there
            self.emit("leftover", {"stopped": f"nothing: the clean-up on node {node[:12]} failed ({type(e).__name__})"})

    def _cancel(self, refs: dict[Any, int]) -> None:
        """Ctrl-C: each task gets KeyboardInterrupt (it stops its server and Locust as locally); what
        came back before is installed."""
        for ref in refs:
            self.ray.cancel(ref)
        deadline = time.monotonic() + CANCEL_WAIT_S
        pending = list(refs)
        while pending and time.monotonic() < deadline:
            _, pending = self.ray.wait(pending, num_returns=len(pending), timeout=1.0)
        self._drain()


def _task_failure(e: Exception, node: str | None) -> str:
    where = f" on node {node[:12]}" if node else ""
    cause = getattr(e, "cause", None)
    if isinstance(cause, KvlabError):
        return f"the server group's Ray task failed{where}: {str(cause).splitlines()[0]}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"the Ray worker running this server group died{where} ({type(e).__name__}: {first})"


def install_repeat(out: Path, cell: Cell, k: int, tar_bytes: bytes) -> Path:
    """A repeat folder from a task, into the results folder whole: unpacked beside it, then renamed
    into place; an unfinished one there is set aside (.partial-*), a complete one is kept."""
    dest = runner.repeat_dir(out, cell, k)
    incoming = runner.inside(out, out / f".incoming-{uuid.uuid4().hex[:12]}")
    try:
        incoming.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:gz") as tar:
            tar.extractall(incoming, filter="data")
        src = incoming / dest.name
        if not src.is_dir():
            raise KvlabError(f"the records of {cell.cell_id} repeat {k} came back without {dest.name}/")
        if runner.is_complete(dest):
            return dest  # never overwritten
        runner._set_aside_partial(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return dest
