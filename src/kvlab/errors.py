"""Errors a user can fix: printed as one line, exit code 2, never a traceback."""


class KvlabError(Exception):
    """Bad input or an impossible request; the message says what was wrong and what to do."""

    exit_code = 2
