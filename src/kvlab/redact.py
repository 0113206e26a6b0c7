"""The one redaction of secrets in what kvlab records or prints: environment variables whose name
says they hold a secret, and the values of secret flags on a command line."""

from __future__ import annotations

REDACTED = "<redacted>"
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "AUTH")
SECRET_FLAGS = ("--api-key", "--hf-token")


def redact_env(env: dict[str, str]) -> dict[str, str]:
    """env with the value of every variable named like a secret (HF_TOKEN, VLLM_API_KEY) replaced."""
    return {k: (REDACTED if any(w in k.upper() for w in SECRET_WORDS) else v) for k, v in env.items()}


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the value of --api-key / --hf-token (as the next word or after '=') replaced."""
    out, hide_next = [], False
    for a in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif a in SECRET_FLAGS:
            out.append(a)
            hide_next = True
        elif a.startswith(tuple(f + "=" for f in SECRET_FLAGS)):
            out.append(a.split("=", 1)[0] + "=" + REDACTED)
        else:
            out.append(a)
    return out
