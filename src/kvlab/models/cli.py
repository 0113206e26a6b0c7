"""`kvlab kv|capacity|compare|gpus|cards|tiny`: the memory model's commands. Flags keep vLLM's
names; `--json` prints one JSON object."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Optional

import typer
from rich.table import Table

from kvlab import hardware
from kvlab.clikit import JSON, console, emit_json, fmt_gib, fmt_int
from kvlab.errors import KvlabError
from kvlab.models import memory
from kvlab.models.budget import SAMPLER_HELP
from kvlab.models.cards import ResolvedModel, builtin_cards, resolve_model, with_hf_overrides
from kvlab.models.params import param_counts
from kvlab.models.weights import weight_bytes, weight_format
from kvlab.serve_config import HF_OVERRIDES_HELP
from kvlab.units import GiB

# Shared option declarations (vLLM's flag names).
KV_DTYPE = typer.Option("auto", "--kv-cache-dtype", help="auto, bfloat16, float16, float32, fp8, fp8_e4m3, fp8_e5m2, fp8_ds_mla (MLA only)")
QUANT = typer.Option(None, "--quantization", "-q", help="Weight quantization: fp8, fp8-block, int8, awq, gptq (4-bit), gptq-int8 (kvlab's name for an 8-bit GPTQ checkpoint), bitsandbytes (nf4); default: the checkpoint's")
DTYPE = typer.Option(None, "--dtype", help="Model dtype: bfloat16, float16, float32 (default: the config's)")
GPU = typer.Option(None, "--gpu", help="GPU preset (kvlab gpus); KV budget estimated from --gpu-memory-utilization")
UTIL = typer.Option(None, "--gpu-memory-utilization",
                    help="Fraction of GPU memory vLLM may use (default: --vllm-version's, 0.92 from vLLM 0.20, 0.9 before)")
KV_GIB = typer.Option(None, "--kv-memory-gib", help="Exact KV budget per GPU in GiB (vLLM's 'Available KV cache memory', or VLLM_CPU_KVCACHE_SPACE); with -pp one for all stages or one per stage, comma-separated (e.g. 20.5,22.1)")
KV_BYTES = typer.Option(None, "--kv-cache-memory-bytes", help="Exact KV budget per GPU in bytes (vLLM's flag)")
MAX_LEN = typer.Option(None, "--max-model-len", help="Context length per request (default: the card's context length, else the config's)")
BLOCK = typer.Option(None, "--block-size", help="Tokens per KV block (default: the attention backend's)")
BACKEND = typer.Option(None, "--attention-backend", help="vLLM attention backend (default: what vLLM picks on the GPU)")
TP = typer.Option(1, "--tensor-parallel-size", "-tp", help="Tensor-parallel GPUs")
PP = typer.Option(1, "--pipeline-parallel-size", "-pp", help="Pipeline-parallel stages")
DP = typer.Option(1, "--data-parallel-size", "-dp", help="Data-parallel replicas (their GPUs split the routed experts)")
EP = typer.Option(False, "--enable-expert-parallel", "-ep", help="Experts owned whole by each GPU (vLLM's flag; same bytes per GPU)")
HF_OVERRIDES = typer.Option(None, "--hf-overrides", help=HF_OVERRIDES_HELP)
SPEC = typer.Option(None, "--speculative-config", "-sc", help="vLLM's JSON: eagle/eagle3/draft_model (\"model\": the draft folder or HF id), mtp, ngram; draft layers share the KV pool, the drafter's weights come off a --gpu budget")
MNBT = typer.Option(None, "--max-num-batched-tokens", help="Default: vLLM's for the GPU")
MNS = typer.Option(None, "--max-num-seqs", help="Default: vLLM's for the GPU")
EAGER = typer.Option(False, "--enforce-eager", help="No CUDA graphs, no torch.compile (vLLM's flag): the --gpu budget loses no graph memory")
CPU = typer.Option(False, "--cpu", help="Size as the CPU build of vLLM does (CPU_MLA / CPU_ATTN backends)")
VLLM_VERSION = typer.Option(memory.DEFAULT_VLLM_VERSION, "--vllm-version",
                            help="Whose memory profiling the --gpu budget mirrors (0.10 or later; CUDA graphs count from 0.21)")
SAMPLER = typer.Option(None, "--sampler", help=SAMPLER_HELP, show_default=False)
NNODES = typer.Option(1, "--nnodes", "-n",
                      help="Nodes the GPUs sit on (vLLM's flag; also for Ray): a TP group spanning nodes "
                           "runs NCCL over the network, which the --gpu budget counts")


def _weights_within(r) -> str:
    """What the weights row holds beside the model's parameters: the rope cache, a drafter, MLA's copy."""
    parts = ([f"the rope cache, {r.rope_cache_bytes / 2**20:,.1f} MiB"] if r.rope_cache_bytes else []) + (
        [f"the drafter, {fmt_gib(r.drafter_weight_bytes)} GiB"] if r.drafter_weight_bytes else []) + (
        [f"MLA's 16-bit kv_b_proj copy, {fmt_gib(r.mla_dequant_bytes)} GiB"] if r.mla_dequant_bytes else [])
    if not parts:
        return ""
    return f" (with {', '.join(parts[:-1]) + ' and ' if len(parts) > 1 else ''}{parts[-1]})"


def kv_facts(m: ResolvedModel, kv_cache_dtype: str, quantization: str | None, dtype: str | None) -> dict:
    a = m.arch
    fp = memory.kv_footprint(a, kv_cache_dtype, 1, dtype)
    fmt = weight_format(quantization, a)
    counts = param_counts(a)
    facts = {
        "model": m.name,
        "hf_id": m.hf_id,
        "source": m.source,
        "architecture": a.architecture,
        "attention": a.attention,
        "num_layers": a.num_layers,
        "num_attention_heads": a.num_attention_heads,
        "num_key_value_heads": a.num_key_value_heads if a.mla is None else None,
        "head_dim": a.head_dim if a.mla is None else None,
        "mla_latent_dim": a.mla.latent_dim if a.mla else None,
        "sliding_window_layers": a.num_sliding_layers,
        "kv_cache_dtype": kv_cache_dtype,
        "kv_bytes_per_element": fp.dtype_bytes,
        "kv_bytes_per_token_per_layer": fp.kv_bytes_per_token_per_layer,
        "kv_bytes_per_token": fp.kv_bytes_per_token,
        "params_total": counts.total,
        "params_active": counts.active,
        "params_active_non_embedding": counts.active_non_embedding,
        "params_exact": counts.exact,
        "moe": a.moe is not None,
        "dtype": a.dtype if dtype is None else dtype,
        "weight_format": fmt.key,
        "weight_bytes": weight_bytes(a, fmt, dtype),
        "provenance": "computed from the model config (kvlab memory model, vLLM V1 accounting)",
    }
    if a.mla is not None:
        # What a calculator reading num_key_value_heads would claim (the error kvlab avoids).
        head = a.hidden_size // a.num_attention_heads
        facts["naive_kv_bytes_per_token"] = 2 * a.num_key_value_heads * head * a.num_layers * fp.dtype_bytes
    return facts


def _resolve(model: str, hf_overrides: str | None) -> ResolvedModel:
    """MODEL as vLLM builds it with --hf-overrides (a JSON object; None: the config as it is)."""
    from kvlab.serve_config import json_flag

    return with_hf_overrides(resolve_model(model), json_flag(hf_overrides, "--hf-overrides"))


def kv_cmd(
    model: str = typer.Argument(..., help="Card name, local folder / config.json, or Hugging Face id"),
    kv_cache_dtype: str = KV_DTYPE,
    quantization: Optional[str] = QUANT,
    dtype: Optional[str] = DTYPE,
    hf_overrides: Optional[str] = HF_OVERRIDES,
    as_json: bool = JSON,
) -> None:
    """KV-cache bytes per token, parameter counts and weight bytes of a model."""
    m = _resolve(model, hf_overrides)
    f = kv_facts(m, kv_cache_dtype, quantization, dtype)
    if as_json:
        emit_json(f)
        return
    t = Table(title=f"{m.name} ({f['attention']}) — computed from the config", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows = [
        ("architecture", f["architecture"]),
        ("layers", str(f["num_layers"])),
    ]
    if f["mla_latent_dim"]:
        rows.append(("cached latent per layer (kv_lora_rank + qk_rope_head_dim)", str(f["mla_latent_dim"])))
    else:
        rows.append(("KV heads x head_dim", f"{f['num_key_value_heads']} x {f['head_dim']}"))
    rows += [
        ("--kv-cache-dtype", f"{kv_cache_dtype} ({f['kv_bytes_per_element']} B/element)"),
        ("KV bytes per token per layer", fmt_int(f["kv_bytes_per_token_per_layer"])),
        ("KV bytes per token", fmt_int(f["kv_bytes_per_token"])),
        ("parameters (total)", fmt_int(f["params_total"])),
        ("parameters (active per token)", fmt_int(f["params_active"])),
        (f"weights ({f['weight_format']}, {f['dtype']})", f"{fmt_gib(f['weight_bytes'])} GiB"),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if "naive_kv_bytes_per_token" in f:
        console.print(
            f"[dim]A calculator using num_key_value_heads={f['num_attention_heads']} would say "
            f"{fmt_int(f['naive_kv_bytes_per_token'])} B/token; vLLM caches only the latent.[/dim]"
        )


def _gib_values(text: str | float) -> list[float]:
    try:
        values = [float(x) for x in str(text).split(",")]
    except ValueError:
        raise KvlabError(f"--kv-memory-gib takes GiB numbers, one or one per pipeline stage (e.g. 20.5,22.1); got {text!r}") from None
    for v in values:
        if not v > 0 or v == float("inf"):
            raise KvlabError(f"--kv-memory-gib must be positive, got {v}")
    return values


def _budget_bytes(kv_memory_gib: str | float | None, kv_cache_memory_bytes: int | None) -> int | list[int] | None:
    if kv_memory_gib is not None and kv_cache_memory_bytes is not None:
        raise KvlabError("give --kv-memory-gib or --kv-cache-memory-bytes, not both")
    if kv_memory_gib is not None:
        values = [int(v * GiB) for v in _gib_values(kv_memory_gib)]
        return values[0] if len(values) == 1 else values
    if kv_cache_memory_bytes is not None and kv_cache_memory_bytes <= 0:
        raise KvlabError(f"--kv-cache-memory-bytes must be positive, got {kv_cache_memory_bytes}")
    return kv_cache_memory_bytes


def run_capacity(m: ResolvedModel, **kw: Any) -> memory.CapacityResult:
    if kw.get("max_model_len") is None:
        kw["max_model_len"] = m.default_max_model_len
    return memory.capacity(m.arch, model_name=m.name, **kw)


def capacity_dict(m: ResolvedModel, r: memory.CapacityResult) -> dict:
    d = r.to_dict()
    d["hf_id"] = m.hf_id
    d["provenance"] = {
        "kv_bytes_per_token": "computed",
        "num_blocks": "computed",
        "kv_cache_tokens": "computed",
        "max_concurrency": "computed",
        "kv_budget_bytes": "given" if r.kv_budget_source == "given" else "estimate (GPU preset x utilization - weights - profiling-run activation peak - non-torch - CUDA graphs, as vLLM profiles)",
    }
    return d


@dataclass(frozen=True)
class CapacityFlags:
    """The sizing flags of `kvlab capacity` and `kvlab compare`, as given (vLLM's names)."""

    gpu: str | None
    gpu_memory_utilization: float | None
    kv_memory_gib: str | None
    kv_cache_memory_bytes: int | None
    max_model_len: int | None
    block_size: int | None
    attention_backend: str | None
    kv_cache_dtype: str
    quantization: str | None
    dtype: str | None
    tensor_parallel_size: int
    pipeline_parallel_size: int
    max_num_batched_tokens: int | None
    max_num_seqs: int | None
    cpu: bool
    data_parallel_size: int | None = None
    enable_expert_parallel: bool | None = None
    speculative_config: str | None = None
    vllm_version: str | None = None
    sampler: str | None = None
    nnodes: int | None = None
    enforce_eager: bool | None = None

    @classmethod
    def of(cls, options: dict[str, Any]) -> "CapacityFlags":
        """From a command's options (its parameters, named as the fields); an option the command
        does not have is None."""
        return cls(**{f.name: options.get(f.name) for f in fields(cls)})

    @property
    def given_budget(self) -> bool:
        return self.gpu is not None or self.kv_memory_gib is not None or self.kv_cache_memory_bytes is not None

    def capacity_kwargs(self) -> dict:
        """Keyword arguments of `memory.capacity`; one budget source, GPU preset or exact bytes."""
        budget = _budget_bytes(self.kv_memory_gib, self.kv_cache_memory_bytes)
        if budget is None and self.gpu is None:
            raise KvlabError("give --gpu NAME (budget estimated) or --kv-memory-gib G (exact budget)")
        if budget is not None and self.gpu is not None:
            raise KvlabError("give either --gpu or an exact KV budget (--kv-memory-gib / --kv-cache-memory-bytes), not both")
        kw = asdict(self)
        for given_only in ("kv_memory_gib", "kv_cache_memory_bytes"):
            del kw[given_only]
        kw["data_parallel_size"] = self.data_parallel_size or 1
        kw["enable_expert_parallel"] = bool(self.enable_expert_parallel)
        kw["cuda_graphs"] = kw["torch_compile"] = not kw.pop("enforce_eager")
        for estimate_only in ("vllm_version", "sampler", "nnodes"):
            if kw[estimate_only] is None:
                del kw[estimate_only]
        return {**kw, "kv_budget_bytes": budget}


def capacity_cmd(
    model: str = typer.Argument(..., help="Card name, local folder / config.json, or Hugging Face id"),
    gpu: Optional[str] = GPU,
    gpu_memory_utilization: Optional[float] = UTIL,
    kv_memory_gib: Optional[str] = KV_GIB,
    kv_cache_memory_bytes: Optional[int] = KV_BYTES,
    max_model_len: Optional[int] = MAX_LEN,
    block_size: Optional[int] = BLOCK,
    attention_backend: Optional[str] = BACKEND,
    kv_cache_dtype: str = KV_DTYPE,
    quantization: Optional[str] = QUANT,
    dtype: Optional[str] = DTYPE,
    tensor_parallel_size: int = TP,
    pipeline_parallel_size: int = PP,
    data_parallel_size: int = DP,
    enable_expert_parallel: bool = EP,
    speculative_config: Optional[str] = SPEC,
    max_num_batched_tokens: Optional[int] = MNBT,
    max_num_seqs: Optional[int] = MNS,
    enforce_eager: bool = EAGER,
    cpu: bool = CPU,
    vllm_version: str = VLLM_VERSION,
    sampler: Optional[str] = SAMPLER,
    nnodes: int = NNODES,
    hf_overrides: Optional[str] = HF_OVERRIDES,
    as_json: bool = JSON,
) -> None:
    """KV blocks, tokens and maximum concurrency vLLM would allocate for one model."""
    m = _resolve(model, hf_overrides)
    flags = CapacityFlags.of(locals())
    r = run_capacity(m, **flags.capacity_kwargs())
    d = capacity_dict(m, r)
    if as_json:
        emit_json(d)
        return
    budget_label = "given" if r.kv_budget_source == "given" else "estimate"
    t = Table(title=f"{m.name} ({r.attention}) — KV capacity", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    where = f"{r.gpu} x{r.num_gpus}" if r.gpu else ("CPU build" if cpu else "exact budget")
    if r.gpu and nnodes > 1:
        where += f" on {nnodes} nodes"
    stages = ", ".join(f"{fmt_gib(b)}" for b in r.kv_budget_bytes_per_stage)
    rows = [
        ("where", where),
        ("--kv-cache-dtype / weights", f"{r.kv_cache_dtype} / {r.quantization}"),
        ("attention backend, block size", f"{r.attention_backend}, {r.block_size}"),
        ("-tp / -pp (layers per stage)", f"{r.tensor_parallel_size} / {r.pipeline_parallel_size} ({', '.join(map(str, r.layers_per_stage))})"),
        ("KV bytes per token per GPU", fmt_int(r.kv_bytes_per_token)),
        *([("speculative draft (method, KV layers on the last stage)",
            f"{r.speculative['method']}, {r.num_draft_layers}")] if r.speculative else []),
        ("page size per layer (bytes)", fmt_int(r.page_size_bytes)),
        ("weights per GPU (GiB)", fmt_gib(r.weight_bytes_per_gpu) + _weights_within(r)),
        (f"KV budget per GPU (GiB, {budget_label})", fmt_gib(r.kv_budget_bytes) if r.pipeline_parallel_size == 1
         else f"{stages} (stage {r.limiting_stage} sets num_blocks)"),
        ("num_blocks", fmt_int(r.num_blocks)),
        ("KV cache tokens", fmt_int(r.kv_cache_tokens)),
        (f"maximum concurrency at {r.max_model_len:,} tokens", f"{r.max_concurrency:,.2f}x"),
    ]
    for row in rows:
        t.add_row(*row)
    console.print(t)
    if r.memory:
        mem = r.memory
        console.print(
            f"[dim]Budget estimate: {fmt_gib(mem.total_bytes)} GiB x {mem.gpu_memory_utilization} = {fmt_gib(mem.requested_bytes)} GiB, "
            f"minus weights {fmt_gib(mem.weight_bytes)}, activations {fmt_gib(mem.activation_bytes)}, non-torch "
            f"{fmt_gib(mem.non_torch_bytes)}, CUDA graphs {fmt_gib(mem.cudagraph_bytes)}"
            + (f", the model runner's request state {fmt_gib(mem.runner_buffer_bytes)}" if mem.runner_buffer_bytes else "")
            + f" GiB (vLLM {vllm_version}'s "
            f"profiling: model runner {mem.model_runner.upper()}, the {mem.sampler} sampler). "
            "vLLM measures these at start; "
            "pass its 'Available KV cache memory' as --kv-memory-gib for an exact answer.[/dim]"
        )
    for w in r.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")


def compare_cmd(
    models: list[str] = typer.Argument(..., help="Two or more models; savings are against the first"),
    gpu: Optional[str] = GPU,
    gpu_memory_utilization: Optional[float] = UTIL,
    kv_memory_gib: Optional[str] = KV_GIB,
    kv_cache_memory_bytes: Optional[int] = KV_BYTES,
    max_model_len: Optional[int] = MAX_LEN,
    block_size: Optional[int] = BLOCK,
    attention_backend: Optional[str] = BACKEND,
    kv_cache_dtype: str = KV_DTYPE,
    quantization: Optional[str] = QUANT,
    dtype: Optional[str] = DTYPE,
    tensor_parallel_size: int = TP,
    pipeline_parallel_size: int = PP,
    data_parallel_size: int = DP,
    enable_expert_parallel: bool = EP,
    max_num_batched_tokens: Optional[int] = MNBT,
    max_num_seqs: Optional[int] = MNS,
    enforce_eager: bool = EAGER,
    cpu: bool = CPU,
    vllm_version: str = VLLM_VERSION,
    sampler: Optional[str] = SAMPLER,
    nnodes: int = NNODES,
    as_json: bool = JSON,
) -> None:
    """Side-by-side KV bytes, capacity and memory saved against the first model.

    Capacity is sized with the same flags as `kvlab capacity` (speculative decoding aside)."""
    if len(models) < 2:
        raise KvlabError("compare needs at least two models")
    resolved = [resolve_model(x) for x in models]
    flags = CapacityFlags.of(locals())
    with_capacity = flags.given_budget
    rows = []
    for m in resolved:
        row = kv_facts(m, kv_cache_dtype, quantization, dtype)
        if with_capacity:
            row["capacity"] = capacity_dict(m, run_capacity(m, **flags.capacity_kwargs()))
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["kv_saved_vs_first_pct"] = 100.0 * (1 - row["kv_bytes_per_token"] / base["kv_bytes_per_token"])
        row["kv_bytes_ratio_first_over_this"] = base["kv_bytes_per_token"] / row["kv_bytes_per_token"]
        if with_capacity:
            row["kv_tokens_ratio_vs_first"] = row["capacity"]["kv_cache_tokens"] / max(1, base["capacity"]["kv_cache_tokens"])
    if as_json:
        emit_json({"baseline": base["model"], "models": rows})
        return
    title = "KV cache per token" + (f" and capacity ({gpu or 'exact budget'})" if with_capacity else "")
    t = Table(title=f"{title}, against {base['model']}")
    t.add_column("model")
    t.add_column("attention")
    t.add_column("KV B/token", justify="right")
    t.add_column("KV saved", justify="right")
    t.add_column("fewer bytes", justify="right")
    if with_capacity:
        t.add_column("KV budget GiB", justify="right")
        t.add_column("KV tokens", justify="right")
        t.add_column("max concurrency", justify="right")
        t.add_column("more tokens", justify="right")
    for row in rows:
        cells = [row["model"], row["attention"], fmt_int(row["kv_bytes_per_token"]),
                 f"{row['kv_saved_vs_first_pct']:.1f}%", f"{row['kv_bytes_ratio_first_over_this']:.2f}x"]
        if with_capacity:
            c = row["capacity"]
            cells += [fmt_gib(c["kv_budget_bytes"]), fmt_int(c["kv_cache_tokens"]), f"{c['max_concurrency']:.2f}x",
                      f"{row['kv_tokens_ratio_vs_first']:.2f}x"]
        t.add_row(*cells)
    console.print(t)
    console.print("[dim]KV saved = 1 - (KV bytes per token / the first model's); fewer bytes = the first "
                  "model's KV bytes per token / this one's. KV bytes per token: computed.[/dim]")
    if with_capacity:
        c = base["capacity"]
        note = "estimated from the GPU preset (weights differ per model)" if c["kv_budget_source"] == "estimate" else "given"
        console.print(f"[dim]KV blocks and tokens: computed; KV budget per GPU: {note}; maximum concurrency at "
                      f"{c['max_model_len']:,} tokens per request; more tokens = KV tokens / the first model's.[/dim]")


KernelData = Callable[[str], Optional[str]]


def gpus_command(kernel_data: KernelData | None) -> Callable[..., None]:
    """`kvlab gpus`; `kernel_data(preset)` says which measured vLLM kernel data the simulator has
    for a preset: its kernel tables and the Marlin rates measured for it (kvlab.sim.timing.gpu_kernel_data,
    wired in by kvlab.cli: the memory model's stage imports nothing from the simulator's)."""

    def gpus_cmd(as_json: bool = JSON) -> None:
        """GPU presets: memory, bandwidth, dense BF16/FP8 TFLOPS, and whether the simulator has measured
        vLLM kernel data for them (else its step times come from the roofline)."""
        presets = hardware.PRESETS
        data = {g.name: kernel_data(g.name) if kernel_data else None for g in presets}
        if as_json:
            emit_json({"gpus": [{**g.to_dict(), "measured_kernel_data": data[g.name]} for g in presets]})
            return
        t = Table(title="GPU presets (data sheets; memory as the runtime reports it)")
        for col in ("name", "memory GB", "runtime GiB", "TB/s", "BF16 TFLOPS", "FP8 TFLOPS", "CC",
                    "measured kernel data\n(simulator step times)"):
            t.add_column(col, justify="left" if col == "name" or col.startswith("measured") else "right")
        for g in presets:
            t.add_row(g.name, f"{g.memory_gb:g}", f"{g.memory_gib:.2f}", f"{g.bandwidth_tb_s:g}", f"{g.bf16_tflops:g}",
                      f"{g.fp8_tflops:g}" if g.fp8_tflops else "—", f"{g.compute_capability:g}",
                      data[g.name] or "— (roofline)")
        console.print(t)

    return gpus_cmd


def cards_cmd(as_json: bool = JSON) -> None:
    """Built-in model cards."""
    cards = builtin_cards()
    if as_json:
        emit_json({"cards": [c.model_dump() for c in cards.values()]})
        return
    t = Table(title="Model cards")
    for col in ("name", "hf_id", "attention", "layers", "quantized checkpoints"):
        t.add_column(col)
    for c in cards.values():
        a = c.arch
        t.add_row(c.name, c.hf_id, a.attention, str(a.num_layers), ", ".join(c.quantized) or "—")
    console.print(t)


def tiny_cmd(
    model: str = typer.Argument(..., help="Card name (kvlab cards)"),
    out: Optional[str] = typer.Option(None, "--out", help="Folder to write (default: $KVLAB_CACHE/twins/NAME, ~/.cache/kvlab)"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a current twin is cached"),
) -> None:
    """Build a tiny random-weight twin with the real model's layers and KV geometry (and a chat tokenizer)."""
    from pathlib import Path

    from kvlab.models.cards import card
    from kvlab.models.twins import build_twin, read_marker

    from kvlab.clikit import live_progress

    with live_progress() as progress:
        task = progress.add_task(f"twin of {model}", total=None)
        folder = build_twin(card(model), Path(out) if out else None, force=force,
                            on_step=lambda what: progress.update(task, description=f"twin of {model}: {what}"))
    info = read_marker(folder)
    console.print(f"twin of {model}: {info.params:,} parameters (random weights, seed {info.seed})")
    sys.stdout.write(f"{folder}\n")


def explain_command(parse_log: Callable[[str], Any]) -> Callable[..., None]:
    """`kvlab explain`, reading the log's startup lines with parse_log (`kvlab.deploy.facts.parse_log`,
    passed in by `kvlab.cli`: the deploy stage sits above this one)."""

    def explain_cmd(
        log: str = typer.Argument(..., help="A vLLM server log (GPU or CPU build)"),
        model: Optional[str] = typer.Option(None, "--model", help="The model, where the log's is not readable here: card name, folder with config.json, or HF id"),
        speculative_config: Optional[str] = SPEC,
        as_json: bool = JSON,
    ) -> None:
        """A vLLM log's KV blocks, tokens and concurrency beside kvlab's, with the reason for any difference."""
        _explain(log, model, speculative_config, as_json, parse_log)

    return explain_cmd


def _explain(log: str, model: str | None, speculative_config: str | None, as_json: bool, parse_log) -> None:
    from pathlib import Path

    from kvlab.models.explain import explain

    path = Path(log)
    if not path.is_file():
        raise KvlabError(f"{log}: no such file")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise KvlabError(f"{log}: not a vLLM server log (binary content)")
    e = explain(data.decode("utf-8", errors="replace"), parse_log=parse_log, source=log, model=model,
                speculative_config=speculative_config)
    if as_json:
        emit_json(e.to_dict())
        return
    cap = e.capacity
    t = Table(title=f"{log}: vLLM {e.vllm_version or '?'} — {e.model}, budget {e.budget}")
    for col in ("figure", "logged", "predicted", "verdict", "reason"):
        t.add_column(col, justify="right" if col in ("logged", "predicted") else "left")

    def show(v, figure):
        if v is None:
            return "—"
        return f"{v:.2f}x" if figure == "max_concurrency" else fmt_int(v)

    for r in e.rows:
        predicted = show(r.predicted, r.figure)
        if r.predicted_low is not None and r.predicted_low != r.predicted_high:
            predicted += f" ({show(r.predicted_low, r.figure)} .. {show(r.predicted_high, r.figure)})"
        t.add_row(r.figure, show(r.logged, r.figure), predicted, r.verdict, r.reason or "")
    console.print(t)
    console.print(f"[dim]kvlab: {cap['attention_backend']}, block {cap['block_size']}, {cap['num_kv_cache_groups']} group(s) "
                  f"of {fmt_int(cap['bytes_per_block'])} B per block, -tp {cap['tensor_parallel_size']} / -pp "
                  f"{cap['pipeline_parallel_size']}, max_model_len {cap['max_model_len']:,}"
                  + (f", {cap['num_draft_layers']} draft layer(s)" if cap["num_draft_layers"] else "") + ".[/dim]")
    for note in e.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def register(app: typer.Typer, kernel_data: KernelData | None = None) -> None:
    app.command("kv")(kv_cmd)
    app.command("capacity")(capacity_cmd)
    app.command("compare")(compare_cmd)
    app.command("gpus")(gpus_command(kernel_data))
    app.command("cards")(cards_cmd)
    app.command("tiny")(tiny_cmd)
