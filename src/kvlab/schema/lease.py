"""The lease file of a running server (kvlab.deploy.process): which process group to stop if the
kvlab that started it is gone (kill -9, the OOM killer)."""

from __future__ import annotations

from kvlab.schema import Record


class ServerLease(Record):
    """The server's process group (pid = pgid, with its start time, so a reused pid is not taken
    for it) and the kvlab process that owns it."""

    KIND = "lease"
    pid: int
    pgid: int
    create_time: float  # psutil's process start time (s since the epoch)
    program: list[str]  # the command's first words, to say what was stopped
    log: str
    kvlab_pid: int
    kvlab_create_time: float

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        return data if version == 0 else super().upgrade(data, version)  # the same keys before schema_version
