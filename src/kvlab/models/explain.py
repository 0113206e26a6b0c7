"""`kvlab explain LOG`: a vLLM server log's KV-cache figures beside the memory model's.

The log gives the model, the flags (the engine config line and "non-default args"), the KV budget
("Available KV cache memory", VLLM_CPU_KVCACHE_SPACE, --kv-cache-memory-bytes) and what vLLM made
of it (blocks, tokens, maximum concurrency). kvlab recomputes the figures from the budget and says,
per figure, whether they agree, agree within the budget's logged rounding (vLLM prints GiB to two
decimals), or differ for a reason it can name (draft layers of a speculative decoder, another
pipeline stage's budget). The log's common lines are read by a `parse_log` the caller passes
(`kvlab.deploy.facts.parse_log`, vLLM 0.10 .. 0.33, GPU and CPU; wired in `kvlab.cli`, as the
memory model sits below the deploy stage); the lines only this command needs are read here.
"""

from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.speculative import SpeculativeDraft
from kvlab.units import GiB

GIB_LOG_STEP = 0.01  # vLLM logs GiB with two decimals ("%.2f" / format_gib)
# Token count per vLLM version (reference/vllm.md): up to 0.20 num_blocks // n_groups x block_size,
# from 0.21 int(max_concurrency x max_model_len).
TOKENS_FROM_CONCURRENCY_SINCE = (0, 21)

_ENGINE_LINE = re.compile(r"(?:Initializing an? (?:V\d )?LLM engine|Dumping input data for V1 LLM engine)"
                          r" \(v[\w.+-]+\) with config: (.*)$", re.M)
_NON_DEFAULT = re.compile(r"non-default args: (\{.*\})\s*$", re.M)
_NAMESPACE = re.compile(r"\bargs: Namespace\((.*)\)\s*$", re.M)
_AVAILABLE = re.compile(r"^(.*?)Available KV cache memory: (\d+(?:\.\d+)?) ?GiB", re.M)
_CPU_SPACE = re.compile(r"(Explicitly|Auto) set \((\d+(?:\.\d+)?)/[\d.]+\) GiB for KV cache")
_RESERVED = re.compile(r"reserved (\d+(?:\.\d+)?) GiB memory for KV Cache")
_V0_REST = re.compile(r"the rest of the memory reserved for KV Cache is (\d+(?:\.\d+)?) ?GiB")  # V0 engine
_NUM_BLOCKS = re.compile(r"(?:# (?:GPU|CPU) blocks: |num_gpu_blocks is: )([\d,]+)")
_PP_RANK = re.compile(r"PP(\d+)")


@dataclass(frozen=True)
class LoggedServer:
    """What a vLLM log says about one server."""

    vllm_version: str | None
    model: str | None
    served_model_name: str | None
    flags: dict[str, Any]  # vLLM's field names (max_model_len, tensor_parallel_size, ...)
    kv_device: str | None
    attention_backend: str | None
    budgets_gib: list[tuple[int | None, float]]  # (pipeline rank if the worker says, GiB) per line
    budget_exact_bytes: int | None  # --kv-cache-memory-bytes or VLLM_CPU_KVCACHE_SPACE
    num_blocks: int | None
    kv_cache_tokens: int | None
    max_concurrency: float | None
    max_model_len: int | None


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _config_fields(line: str) -> dict[str, Any]:
    """key=value pairs of vLLM's engine config line (simple values only)."""
    out: dict[str, Any] = {}
    for key, value in re.findall(r"(?:^|, )(\w+)=('[^']*'|[\w.+-]+)", line):
        out.setdefault(key, value.strip("'"))
    spec = re.search(r"speculative_config=(SpeculativeConfig\(.*?\))(?:, \w+=|$)", line)
    if spec:
        inner = dict(re.findall(r"(\w+)=('[^']*'|[\w.+-]+)", spec.group(1)))
        out["speculative_config"] = {k: v.strip("'") for k, v in inner.items()}
    return out


def _args(text: str) -> dict[str, Any]:
    """The flags the user gave: "non-default args: {...}" (0.8+), or old "args: Namespace(...)"."""
    m = _NON_DEFAULT.search(text)
    if m:
        parsed = _literal(m.group(1))
        if isinstance(parsed, dict):
            return parsed
        return {k: _literal(v) if _literal(v) is not None else v.strip("'")
                for k, v in re.findall(r"'(\w+)': ('[^']*'|[\w.+-]+)", m.group(1))}
    m = _NAMESPACE.search(text)
    if m:
        return {k: _literal(v) if _literal(v) is not None else v
                for k, v in re.findall(r"(\w+)=('[^']*'|[\w.+-]+)", m.group(1))}
    return {}


def _int(value: Any) -> int | None:
    try:
        return int(str(value).replace(",", ""))
    except (TypeError, ValueError):
        return None


def read_log(text: str, parse_log: Callable[[str], Any]) -> LoggedServer:
    """The model, flags and KV lines of a vLLM server log; KvlabError for a log that is not one.
    parse_log(text): the startup facts (`kvlab.deploy.facts.StartupFacts`)."""
    if not isinstance(text, str) or "\x00" in text:
        raise KvlabError("not a vLLM server log: binary content")
    found = parse_log(text)
    engine = _ENGINE_LINE.search(text)
    config = _config_fields(engine.group(1)) if engine else {}
    args = _args(text)
    if found.kv_cache_tokens is None and found.num_gpu_blocks is None and not _NUM_BLOCKS.search(text):
        raise KvlabError("not a vLLM server log, or one that stopped before sizing the KV cache: no "
                         "'GPU KV cache size: N tokens' (or '# GPU blocks: N') line")
    flags: dict[str, Any] = {}
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        value = _int(args.get(key, config.get(key)))
        if value:
            flags[key] = value
    for key in ("kv_cache_dtype", "quantization"):
        value = args.get(key, config.get(key))
        if value not in (None, "None"):
            flags[key] = str(value)
    dtype = args.get("dtype") or config.get("dtype")
    if dtype not in (None, "None", "auto"):
        flags["dtype"] = str(dtype).removeprefix("torch.")
    for key in ("block_size", "num_gpu_blocks_override", "kv_cache_memory_bytes", "max_num_batched_tokens"):
        value = _int(args.get(key))
        if value:
            flags[key] = value
    if args.get("enable_expert_parallel"):
        flags["enable_expert_parallel"] = True
    spec = args.get("speculative_config") or config.get("speculative_config")
    if isinstance(spec, str):
        spec = _literal(spec) if spec not in ("None", "") else None
    if isinstance(spec, dict):
        flags["speculative_config"] = _speculative_from_log(spec)
    if args.get("attention_backend"):
        flags["attention_backend"] = str(args["attention_backend"])
    max_model_len = found.max_model_len or _int(config.get("max_seq_len")) or _int(args.get("max_model_len"))
    budgets = [(int(p.group(1)) if (p := _PP_RANK.search(m.group(1))) else None, float(m.group(2)))
               for m in _AVAILABLE.finditer(text)]
    exact = _int(args.get("kv_cache_memory_bytes"))
    cpu = _CPU_SPACE.search(text)
    if exact is None and cpu and cpu.group(1) == "Explicitly":
        exact = int(float(cpu.group(2)) * GiB)  # VLLM_CPU_KVCACHE_SPACE, whole GiB as given
    elif cpu:
        budgets.append((None, float(cpu.group(2))))
    reserved = _RESERVED.search(text) or _V0_REST.search(text)
    if exact is None and reserved:
        budgets.append((None, float(reserved.group(1))))
    blocks = _NUM_BLOCKS.search(text)
    device = found.kv_device or ("CPU" if config.get("device_config") == "cpu" else None)
    return LoggedServer(
        vllm_version=found.vllm_version, model=args.get("model") or config.get("model"),
        served_model_name=_served_name(args, config), flags=flags, kv_device=device,
        attention_backend=found.attention_backend, budgets_gib=budgets, budget_exact_bytes=exact,
        num_blocks=_int(blocks.group(1)) if blocks else found.num_gpu_blocks,
        kv_cache_tokens=found.kv_cache_tokens, max_concurrency=found.max_concurrency, max_model_len=max_model_len,
    )


def _served_name(args: dict, config: dict) -> str | None:
    names = args.get("served_model_name")
    if isinstance(names, list) and names:
        return str(names[0])
    return str(config["served_model_name"]) if config.get("served_model_name") not in (None, "None") else None


def _speculative_from_log(spec: dict) -> dict:
    """The --speculative-config JSON as vLLM's args or its SpeculativeConfig repr give it."""
    out = {k: v for k, v in spec.items() if k in ("method", "model", "num_speculative_tokens",
                                                   "draft_tensor_parallel_size", "kv_cache_dtype")
           and v not in (None, "None")}
    if "num_spec_tokens" in spec and "num_speculative_tokens" not in out:
        out["num_speculative_tokens"] = _int(spec["num_spec_tokens"])
    if isinstance(out.get("num_speculative_tokens"), str):
        out["num_speculative_tokens"] = _int(out["num_speculative_tokens"])
    return out


# ---------------------------------------------------------------------------------------------
# Recomputing


@dataclass(frozen=True)
class Row:
    """One figure: logged beside predicted, with a verdict and the reason for a difference."""

    figure: str
    logged: float | int | None
    predicted: float | int | None
    predicted_low: float | int | None = None  # across the budget's logged rounding
    predicted_high: float | int | None = None
    verdict: str = ""  # equal | within rounding band | differs | not logged
    reason: str | None = None


@dataclass(frozen=True)
class Explanation:
    log: str
    vllm_version: str | None
    model: str
    kv_device: str | None
    budget: str  # in words: where the KV budget came from
    capacity: dict
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def agrees(self) -> bool:
        return all(r.verdict in ("equal", "within rounding band", "not logged") for r in self.rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["agrees"] = self.agrees
        return d


def _version(v: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", v or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def _tokens(version: tuple[int, int] | None, cap: memory.CapacityResult) -> int:
    if version is not None and version < TOKENS_FROM_CONCURRENCY_SINCE:
        return cap.num_blocks // cap.num_kv_cache_groups * cap.block_size
    return cap.kv_cache_tokens


def _figures(version, cap: memory.CapacityResult) -> dict[str, float]:
    return {"num_blocks": cap.num_blocks, "kv_cache_tokens": _tokens(version, cap),
            "max_concurrency": cap.max_concurrency}


def _matches(figure: str, logged, value) -> bool:
    if figure == "max_concurrency":
        return round(value, 2) == round(logged, 2)
    return int(logged) == int(value)


def explain(text: str, *, parse_log: Callable[[str], Any], source: str = "LOG", model: str | None = None,
            resolve: Callable[[str], Any] | None = None, speculative_config: str | None = None) -> Explanation:
    """Recompute a log's KV figures; `model` overrides the log's model (a card, folder or HF id);
    parse_log as in `read_log`."""
    from kvlab.models.cards import resolve_model

    logged = read_log(text, parse_log)
    resolve = resolve or resolve_model
    resolved = _resolve(logged, model, resolve)
    flags = dict(logged.flags)
    if speculative_config is not None:
        flags["speculative_config"] = speculative_config
    notes: list[str] = []
    pp = flags.get("pipeline_parallel_size", 1)
    budget_words, budgets, band = _budget(logged, pp, notes)
    kw = _capacity_kwargs(logged, flags, notes)
    draft_note = None
    try:
        cap = memory.capacity(resolved.arch, model_name=resolved.name, kv_budget_bytes=budgets, **kw)
    except KvlabError as e:
        if "speculative_config" not in kw:
            raise
        draft_note = f"the speculative draft was not sized ({e}); predicted without its layers"
        notes.append(draft_note)
        kw.pop("speculative_config")
        cap = memory.capacity(resolved.arch, model_name=resolved.name, kv_budget_bytes=budgets, **kw)
    version = _version(logged.vllm_version)
    center = _figures(version, cap)
    lo_hi = [_figures(version, memory.capacity(resolved.arch, model_name=resolved.name, kv_budget_bytes=b, **kw))
             for b in band] if band else []
    rows = []
    for figure, value in center.items():
        got = getattr(logged, figure)
        low = min([value] + [f[figure] for f in lo_hi])
        high = max([value] + [f[figure] for f in lo_hi])
        if got is None:
            rows.append(Row(figure, None, value, low, high, "not logged"))
        elif _matches(figure, got, value):
            rows.append(Row(figure, got, value, low, high, "equal"))
        elif lo_hi and (low <= got <= high or any(_matches(figure, got, f[figure]) for f in lo_hi)):
            rows.append(Row(figure, got, value, low, high, "within rounding band",
                            f"the budget is logged to {GIB_LOG_STEP} GiB"))
        else:
            rows.append(Row(figure, got, value, low, high, "differs",
                            _reason(logged, resolved, kw, budgets, band, figure, got, version, pp, draft_note)))
    if logged.max_model_len and cap.max_model_len != logged.max_model_len:
        notes.append(f"max_model_len {cap.max_model_len} predicted, {logged.max_model_len} logged")
    return Explanation(log=source, vllm_version=logged.vllm_version, model=resolved.name,
                       kv_device=logged.kv_device, budget=budget_words, capacity=cap.to_dict(), rows=rows,
                       notes=notes)


def _resolve(logged: LoggedServer, model: str | None, resolve) -> Any:
    """The model: --model, else the log's model, served name or folder name, as kvlab resolves it."""
    if model:
        return resolve(model)
    candidates = [c for c in (logged.model, logged.served_model_name,
                              (logged.model or "").rstrip("/").rsplit("/", 1)[-1] or None) if c]
    if not candidates:
        raise KvlabError("the log names no model (no engine config or non-default args line): give --model "
                         "(a card, a folder with config.json or a Hugging Face id)")
    errors = []
    for c in dict.fromkeys(candidates):
        try:
            return resolve(c)
        except KvlabError as e:
            errors.append(str(e))
    raise KvlabError(f"cannot read the log's model {candidates[0]!r} ({errors[0]}); give --model (a card, a "
                     "folder with config.json or a Hugging Face id)")


def _budget(logged: LoggedServer, pp: int, notes: list[str]) -> tuple[str, Any, list]:
    """The KV budget (bytes, or one per stage), how it was read, and the band of its rounding."""
    if logged.budget_exact_bytes is not None:
        return f"{logged.budget_exact_bytes / GiB:.2f} GiB, exact", logged.budget_exact_bytes, []
    if not logged.budgets_gib:
        raise KvlabError("the log gives no KV budget ('Available KV cache memory', VLLM_CPU_KVCACHE_SPACE or "
                         "--kv-cache-memory-bytes): nothing to recompute from")
    step = GIB_LOG_STEP / 2
    by_rank: dict[int, float] = {}
    for rank, gib in logged.budgets_gib:
        if rank is not None:
            by_rank[rank] = min(gib, by_rank.get(rank, gib))
    if pp > 1 and len(by_rank) == pp:
        values = [by_rank[i] for i in range(pp)]
        words = "per stage " + ", ".join(f"{v:.2f}" for v in values) + " GiB, logged"
    else:
        values = [min(g for _, g in logged.budgets_gib)]
        if pp > 1 and len({g for _, g in logged.budgets_gib}) > 1:
            notes.append("the workers logged different budgets without naming their stage: the smallest is "
                         "taken for every stage")
        words = f"{values[0]:.2f} GiB, logged"
    center = [int(v * GiB) for v in values]
    band = [[int((v - step) * GiB) for v in values], [int((v + step) * GiB) - 1 for v in values]]
    unpack = (lambda b: b[0] if len(b) == 1 else b)
    return words, unpack(center), [unpack(b) for b in band]


def _capacity_kwargs(logged: LoggedServer, flags: dict, notes: list[str]) -> dict:
    kw: dict[str, Any] = dict(max_model_len=logged.max_model_len, allow_long_max_model_len=True,
                              cpu=logged.kv_device == "CPU")
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "block_size",
                "num_gpu_blocks_override", "max_num_batched_tokens", "enable_expert_parallel"):
        if key in flags:
            kw[key] = flags[key]
    if flags.get("kv_cache_dtype"):
        kw["kv_cache_dtype"] = flags["kv_cache_dtype"]
    if flags.get("dtype"):
        kw["dtype"] = flags["dtype"]
    backend = flags.get("attention_backend") or logged.attention_backend
    if backend in memory.ATTENTION_BACKENDS:
        kw["attention_backend"] = backend
    elif backend:
        notes.append(f"attention backend {backend} is not one kvlab sizes: the default one is assumed")
    if flags.get("speculative_config"):
        kw["speculative_config"] = flags["speculative_config"]
    return kw


def _reason(logged, resolved, kw, budgets, band, figure, got, version, pp, draft_note) -> str:
    """Why a figure differs, where kvlab can tell: draft layers, another stage, or unknown."""
    if kw.get("speculative_config") is None:
        for k in range(1, 9):
            draft = SpeculativeDraft("draft layers", None, arch=replace(
                resolved.arch, num_layers=k, layer_types=("full_attention",) * k, sliding_window=None,
                num_nextn_predict_layers=0))
            tries = [budgets] + list(band)
            for b in tries:
                cap = memory.capacity(resolved.arch, kv_budget_bytes=b, **{**kw, "speculative_config": draft})
                value = _figures(version, cap)[figure]
                if _matches(figure, got, value):
                    if draft_note:
                        return (f"{draft_note}; the figures are consistent with {k} draft layer(s) of the model's "
                                "geometry: pass --speculative-config with a draft folder readable here")
                    return (f"consistent with {k} draft layer(s) of the model's geometry in the same KV pool: a "
                            "speculative decoder (EAGLE, MTP) the log does not name; pass --speculative-config")
    if draft_note:
        return draft_note
    if pp > 1:
        return ("another pipeline stage: vLLM keeps the smallest block count of all stages, and this log does "
                "not say which worker is which stage")
    return "not a difference kvlab can explain (flags or a model config the log does not show?)"
