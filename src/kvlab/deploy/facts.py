"""What a vLLM server reported at start: read from its log and from `vllm:cache_config_info`.

The regexes accept the line variants of vLLM 0.10 .. 0.33 (`../shared/reference/vllm.md`): "GPU KV
cache size" (CUDA) or "CPU KV cache size" (the CPU build), with the maximum concurrency on the same
line (0.28+) or the next (up to 0.27); "Available KV cache memory" (GPU), "reserved X GiB memory
for KV Cache" (--kv-cache-memory-bytes) or "Explicitly/Auto set (X/Y) GiB for KV cache" (CPU); the
profiling run's split, "Actual usage is ..." (GPU, 0.10.2+, in its two wordings).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace



@dataclass(frozen=True)
class StartupFacts:
    """Startup facts of one server; None where the log and /metrics did not say."""

    vllm_version: str | None = None
    attention_backend: str | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    max_model_len: int | None = None
    available_kv_memory_gib: float | None = None
    kv_cache_memory_bytes: int | None = None
    cache_dtype: str | None = None
    enable_prefix_caching: bool | None = None
    model_weights_gib: float | None = None
    kv_device: str | None = None  # "GPU", "CPU" (the prefix of the KV cache size line)
    timing_source: str | None = None  # kvlab's simulator only: its step-time source (kvlab.sim.timing)
    host_source: str | None = None  # kvlab's simulator only: what prices its time outside the steps
    sampler: str | None = None  # the top-k/top-p sampler vLLM logged taking: "flashinfer" or "pytorch"
    model_runner: str | None = None  # the model runner the log shows: "v1" or "v2" (Model Runner V2)
    # The profiling run's split, vLLM's "Actual usage is ..." line (`_usage`): the peak activation, and
    # either the consumed memory (weights + non-torch, 0.27+) or the non-torch memory (0.10.2-0.26); the
    # CUDA-graph memory its capture took after the KV cache was sized.
    peak_activation_gib: float | None = None
    consumed_memory_gib: float | None = None
    non_torch_memory_gib: float | None = None
    cudagraph_memory_gib: float | None = None

    def merged(self, other: "StartupFacts") -> "StartupFacts":
        """These facts, with other's where other has one (other = /metrics, the exact figures)."""
        return replace(self, **{f.name: getattr(other, f.name) for f in fields(other)
                                if getattr(other, f.name) is not None})

    def to_dict(self) -> dict:
        return asdict(self)


def _int(s: str) -> int:
    return int(s.replace(",", ""))


_NUM = r"([\d,]+)"
_F = r"(\d+(?:\.\d+)?)"
LOG_PATTERNS: dict[str, tuple[re.Pattern, ...]] = {
    "vllm_version": (
        re.compile(r"Initializing a V1 LLM engine \(v([\w.+-]+)\)"),
        re.compile(r"vLLM API server version ([\w.+-]+)"),
        re.compile(r"\bversion (\d+\.\d+[\w.+-]*)"),  # the banner
    ),
    "kv_cache_tokens": (re.compile(r"(?:^|[\s:\]])([A-Z]+)(?: \+ host)? KV cache size: " + _NUM + r" tokens"),),
    "max_concurrency": (re.compile(r"Maximum concurrency for " + _NUM + r" tokens per request: " + _F + "x"),),
    "available_kv_memory_gib": (
        re.compile(r"Available KV cache memory: " + _F + r" ?GiB"),
        re.compile(r"reserved " + _F + r" GiB memory for KV Cache"),
        re.compile(r"(?:Explicitly|Auto) set \(" + _F + r"/[\d.]+\) GiB for KV cache"),
    ),
    "model_weights_gib": (
        re.compile(r"Model loading took " + _F + r" ?Gi?B"),
        re.compile(r"Loading model weights took " + _F + r" ?Gi?B"),
    ),
    "num_gpu_blocks": (re.compile(r"# (?:GPU|CPU) blocks: " + _NUM),),
    "max_model_len": (re.compile(r"Using max model len " + _NUM),),
    "cache_dtype": (re.compile(r"\bkv_cache_dtype=([\w]+)"),),
    "enable_prefix_caching": (re.compile(r"\benable_prefix_caching=(True|False)"),),
    "timing_source": (re.compile(r"\btiming source: (.+?)\s*$", re.M),),
    "host_source": (re.compile(r"\btime outside the steps: (.+?)\s*$", re.M),),
}

# The top-k/top-p sampler's lines (vllm/v1/sample/ops/topk_topp_sampler.py, 0.8 .. 0.32): FlashInfer's,
# or the PyTorch-native fallback in its wordings ("Falling back to the PyTorch-native implementation",
# "FlashInfer version >= 0.2.3 required. Falling back to default sampling implementation",
# "FlashInfer top-p/top-k sampling disabled via VLLM_USE_FLASHINFER_SAMPLER=0", "... unavailable: ...;
# falling back", "... not supported on compute capability ...; falling back to PyTorch-native sampler").
# 0.11.1-0.20 log the opt-in hint at debug level only: there the log says nothing.
_SAMPLER = (
    ("flashinfer", re.compile(r"Using FlashInfer for top-p & top-k sampling")),
    ("pytorch", re.compile(r"(?i)falling back to (?:the )?PyTorch-native|"
                           r"Falling back to default sampling implementation|"
                           r"FlashInfer top-p/top-k sampling (?:disabled|unavailable|not supported)")),
)


def _sampler(text: str) -> str | None:
    for name, pattern in _SAMPLER:
        if pattern.search(text):
            return name
    return None


# The model runner: Model Runner V2 says so ("Using V2 Model Runner", vllm/v1/worker/gpu_worker.py, 0.22 ..
# 0.32), and each runner logs its weights from its own file: V1's gpu_model_runner.py, V2's model_runner.py
# (vllm/v1/worker/gpu/model_runner.py).
_V2_RUNNER = re.compile(r"Using V2 Model Runner|(?<![\w.])model_runner\.py:\d+\]\s+Model loading took")
_V1_RUNNER = re.compile(r"gpu_model_runner\.py:\d+\]\s+Model loading took")


# The profiling run's split as `Worker.determine_available_memory` / `compile_or_warm_up_model` log it
# (vllm/v1/worker/gpu_worker.py): from 0.27 "Actual usage is W GiB for consumed memory (weights +
# non-torch), A GiB for peak activation, and C GiB for CUDAGraph memory" (INFO), where the peak holds the
# transient headroom plus the CUDA-graph estimate; from 0.10.2 to 0.26 "Actual usage is W GiB for weight,
# A GiB for peak activation, N GiB for non-torch memory, and C GiB for CUDAGraph memory" (DEBUG up to 0.22).
_G = r"(-?\d+(?:\.\d+)?) GiB"
_USAGE_CONSUMED = re.compile(r"Actual usage is " + _G + r" for consumed memory \(weights \+ non-torch\), " + _G
                             + r" for peak activation, and " + _G + r" for CUDAGraph memory")
_USAGE_SPLIT = re.compile(r"Actual usage is " + _G + r" for weight, " + _G + r" for peak activation, " + _G
                          + r" for non-torch memory, and " + _G + r" for CUDAGraph memory")


def _usage(text: str) -> dict:
    m = _USAGE_CONSUMED.search(text)
    if m:
        return {"consumed_memory_gib": float(m.group(1)), "peak_activation_gib": float(m.group(2)),
                "cudagraph_memory_gib": float(m.group(3))}
    m = _USAGE_SPLIT.search(text)
    if m:
        return {"peak_activation_gib": float(m.group(2)), "non_torch_memory_gib": float(m.group(3)),
                "cudagraph_memory_gib": float(m.group(4))}
    return {}


def _model_runner(text: str) -> str | None:
    if _V2_RUNNER.search(text):
        return "v2"
    return "v1" if _V1_RUNNER.search(text) else None


# "Using X backend" lines that name the attention backend (not MoE, prefill or ViT backends).
_BACKEND = re.compile(
    r"Using ([A-Za-z][\w ]*?) (?:attention )?backend(?: on V1 engine| out of potential backends|\.|\s*$)",
    re.M,
)
_NOT_ATTENTION = re.compile(r"MoE|prefill|Experts|vit|ViT|Quantized|SSM|sampler", re.I)
# Display names of older releases -> the AttentionBackendEnum names kvlab's memory model uses.
BACKEND_NAMES = {
    "flash attention": "FLASH_ATTN",
    "flashattention": "FLASH_ATTN",
    "flashinfer": "FLASHINFER",
    "flashmla": "FLASHMLA",
    "flashinfer mla": "FLASHINFER_MLA",
    "triton mla": "TRITON_MLA",
    "cutlass mla": "CUTLASS_MLA",
    "cutlass_mla": "CUTLASS_MLA",
    "flash attention mla": "FLASH_ATTN_MLA",
    "flashattn mla": "FLASH_ATTN_MLA",
    "triton": "TRITON_ATTN",
    "triton attention": "TRITON_ATTN",
    "torch sdpa": "TORCH_SDPA",
}


def normalize_backend(name: str) -> str:
    key = name.strip().lower()
    if key in BACKEND_NAMES:
        return BACKEND_NAMES[key]
    return name.strip().upper().replace(" ", "_")


def _attention_backend(text: str) -> str | None:
    for m in _BACKEND.finditer(text):
        name = m.group(1)
        if not _NOT_ATTENTION.search(name):
            return normalize_backend(name)
    return None


def parse_log(text: str) -> StartupFacts:
    """Startup facts from a vLLM server log (first occurrence of each line)."""
    found: dict = {}
    for key, patterns in LOG_PATTERNS.items():
        for pat in patterns:
            m = pat.search(text)
            if m:
                found[key] = m
                break
    out: dict = {"attention_backend": _attention_backend(text), "sampler": _sampler(text),
                 "model_runner": _model_runner(text), **_usage(text)}
    if "vllm_version" in found:
        out["vllm_version"] = found["vllm_version"].group(1)
    if "kv_cache_tokens" in found:
        out["kv_device"] = found["kv_cache_tokens"].group(1)
        out["kv_cache_tokens"] = _int(found["kv_cache_tokens"].group(2))
    if "max_concurrency" in found:
        out["max_model_len"] = _int(found["max_concurrency"].group(1))
        out["max_concurrency"] = float(found["max_concurrency"].group(2))
    elif "max_model_len" in found:
        out["max_model_len"] = _int(found["max_model_len"].group(1))
    for key in ("available_kv_memory_gib", "model_weights_gib"):
        if key in found:
            out[key] = float(found[key].group(1))
    if "num_gpu_blocks" in found:
        out["num_gpu_blocks"] = _int(found["num_gpu_blocks"].group(1))
    if "cache_dtype" in found:
        out["cache_dtype"] = found["cache_dtype"].group(1)
    if "enable_prefix_caching" in found:
        out["enable_prefix_caching"] = found["enable_prefix_caching"].group(1) == "True"
    for key in ("timing_source", "host_source"):
        if key in found:
            out[key] = found[key].group(1)
    return StartupFacts(**out)


def kv_size_logged(text: str) -> bool:
    """Whether vLLM has logged its KV cache size (what --allocation-only waits for)."""
    return LOG_PATTERNS["kv_cache_tokens"][0].search(text) is not None


# The phases of vLLM's start, each from the first log line that begins it (V1 engine, GPU and CPU
# builds; the simulator prints the same lines): what `kvlab serve` shows while it waits for /health.
STARTUP_PHASES = (
    ("resolving the model", re.compile(r"Resolved architecture: |non-default args: ")),
    ("starting the engine core", re.compile(r"Initializing a V1 LLM engine")),
    ("loading weights", re.compile(r"Starting to load model |Loading safetensors checkpoint shards|Loading weights took")),
    ("profiling memory", re.compile(r"Model loading took |Memory profiling takes|Profiling CUDA graph memory|"
                                    r"torch\.compile takes|Dynamo bytecode transform time")),
    ("sizing the KV cache", re.compile(r"Available KV cache memory: |GiB for KV cache|GiB memory for KV Cache")),
    ("capturing CUDA graphs", re.compile(r"Capturing CUDA graphs?|Capturing cudagraphs?", re.I)),
    ("warming up", re.compile(r"Graph capturing finished|init engine \(profile, create kv cache, warmup model\)")),
    ("starting the API server", re.compile(r"Starting vLLM (?:API )?server|Application startup complete")),
)


def startup_phase(text: str) -> str | None:
    """The phase of vLLM's start a log has reached (the latest one whose line it holds), or None."""
    last, where = None, -1
    for name, pattern in STARTUP_PHASES:
        pos = -1
        for m in pattern.finditer(text):
            pos = m.start()
        if pos > where:
            last, where = name, pos
    return last


_ERROR = re.compile(r"\b((?:[A-Z]\w*)?(?:Error|Exception): .+)$", re.M)


def error_after_kv_size(text: str) -> str | None:
    """The first exception vLLM logged after sizing its KV cache (a start that fails after sizing)."""
    m = LOG_PATTERNS["kv_cache_tokens"][0].search(text)
    if m is None:
        return None
    err = _ERROR.search(text, m.end())
    return err.group(1).strip() if err else None


# ---------------------------------------------------------------------------------------------
# /metrics: vllm:cache_config_info (labels = CacheConfig fields as strings)


TIMING_INFO = "kvlab:sim_timing_info"  # kvlab.sim.metrics


def info_labels(metrics_text: str, family_name: str) -> dict[str, str] | None:
    """The labels of an info series (the first sample of `family_name`), or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        if family.name == family_name:
            for sample in family.samples:
                return dict(sample.labels)
    return None


def cache_config_labels(metrics_text: str) -> dict[str, str] | None:
    return info_labels(metrics_text, "vllm:cache_config_info")


def _opt(labels: dict[str, str], key: str, cast):
    v = labels.get(key)
    if v is None or v in ("None", ""):
        return None
    return cast(v)


def parse_cache_config_info(metrics_text: str) -> StartupFacts:
    """Startup facts from `vllm:cache_config_info` on /metrics (empty when it is missing), with the
    step-time source of kvlab's simulator from `kvlab:sim_timing_info` where it is there."""
    labels = cache_config_labels(metrics_text)
    info = info_labels(metrics_text, TIMING_INFO) or {}
    timing, host = info.get("timing_source") or None, info.get("host_source") or None
    if labels is None:
        return StartupFacts(timing_source=timing, host_source=host)
    kv_bytes = _opt(labels, "kv_cache_memory_bytes", int)
    return StartupFacts(
        block_size=_opt(labels, "block_size", int),
        num_gpu_blocks=_opt(labels, "num_gpu_blocks", int),
        kv_cache_tokens=_opt(labels, "kv_cache_size_tokens", int),
        max_concurrency=_opt(labels, "kv_cache_max_concurrency", float),
        kv_cache_memory_bytes=kv_bytes,
        cache_dtype=_opt(labels, "cache_dtype", str),
        enable_prefix_caching=_opt(labels, "enable_prefix_caching", lambda s: s == "True"),
        timing_source=timing,
        host_source=host,
    )
