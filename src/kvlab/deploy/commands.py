"""The exact command line and environment of a server (an argv list, never a shell string); each
engine builds its own (`kvlab.deploy.engines`)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from kvlab.redact import redact_env  # the one redaction (kvlab.redact)


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set on top of the inherited environment
    unset: tuple[str, ...] = ()  # removed from the inherited environment

    @property
    def display_env(self) -> dict[str, str]:
        """env with secrets redacted: what may be printed or recorded."""
        return redact_env(self.env)

    def child_env(self, base: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if k not in self.unset}
        env.update(self.env)
        return env

    def shell_line(self) -> str:
        """For display only: the environment and argv quoted as a POSIX shell would need."""
        assigns = [f"{k}={shlex.quote(v)}" for k, v in self.display_env.items()]
        unsets = [f"-u {k}" for k in self.unset]
        prefix = " ".join((["env", *unsets] if unsets else []) + assigns)
        return (prefix + " " if prefix else "") + shlex.join(self.argv)


from kvlab.redact import redact_env  # the one redaction (kvlab.redact)
