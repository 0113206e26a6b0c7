"""kvlab's prediction (the memory model) beside what the server reported, row by row."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kvlab.deploy.facts import StartupFacts
from kvlab.models.memory import CapacityResult
from kvlab.units import GiB


@dataclass(frozen=True)
class Comparison:
    quantity: str
    predicted: int | float | str | None
    reported: int | float | str | None
    match: bool | None  # None: the server did not report it
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _row(quantity: str, predicted, reported, match: bool | None = None, note: str = "") -> Comparison:
    if reported is None:
        return Comparison(quantity, predicted, None, None, note or "not reported")
    if match is None:
        match = predicted == reported
    return Comparison(quantity, predicted, reported, match, note)


def compare(pred: CapacityResult, facts: StartupFacts, predicted_backend: str | None = None) -> list[Comparison]:
    """Rows for KV tokens, blocks, block size, concurrency, context, budget and backend."""
    budget_note = "" if pred.kv_budget_source == "given" else "the predicted budget is an estimate"
    rows = [
        _row("kv_cache_tokens", pred.kv_cache_tokens, facts.kv_cache_tokens, note=budget_note),
        _row("num_blocks", pred.num_blocks, facts.num_gpu_blocks, note=budget_note),
        _row("block_size", pred.block_size, facts.block_size),
        _row("max_model_len", pred.max_model_len, facts.max_model_len),
    ]
    # The log prints the concurrency with 2 decimals, /metrics exactly.
    mc = facts.max_concurrency
    rows.append(_row("max_concurrency", round(pred.max_concurrency, 6), mc,
                     None if mc is None else abs(pred.max_concurrency - mc) <= 0.005 + 1e-9, budget_note))
    if facts.kv_cache_memory_bytes is not None:
        rows.append(_row("kv_budget_bytes", pred.kv_budget_bytes, facts.kv_cache_memory_bytes, note=budget_note))
    else:
        rows.append(_gib_row("kv_budget_gib", pred.kv_budget_bytes, facts.available_kv_memory_gib,
                             budget_note or "vLLM logs it in GiB with 2 decimals"))
    rows.append(_row("attention_backend", predicted_backend or pred.attention_backend, facts.attention_backend))
    if pred.memory is not None:  # the estimated budget's profiling run assumed this sampler
        rows.append(_row("sampler", pred.memory.sampler, facts.sampler,
                         note="the profiling run's top-k/top-p sampler the budget estimate assumes (--sampler)"))
        rows.append(_row("model_runner", pred.memory.model_runner, facts.model_runner,
                         note="the model runner whose profiling run the budget estimate mirrors (vLLM's default)"))
        rows.extend(_terms(pred.memory, facts))
    return rows


def _gib_row(quantity: str, predicted_bytes: int, reported: float | None, note: str) -> Comparison:
    """A figure in GiB beside the log's, which vLLM prints with 2 decimals: the same within that rounding."""
    return _row(quantity, round(predicted_bytes / GiB, 2), reported,
                None if reported is None else abs(predicted_bytes / GiB - reported) <= 0.005 + 1e-9, note)


def _term_row(quantity: str, predicted_bytes: int, reported: float | None, note: str) -> Comparison:
    return _gib_row(quantity, predicted_bytes, reported, "an estimated term of the budget; " + note)


def _terms(mem, facts: StartupFacts) -> list[Comparison]:
    """The budget estimate's terms beside the profiling run's split where the log gives it (vLLM's "Actual
    usage is ..." line), in the log's own terms: from 0.27 the consumed memory is the weights, non-torch
    memory and the model runner's request state, and the peak activation holds the CUDA-graph estimate
    vLLM subtracts; before, the peak is the profiling run's alone and the non-torch memory its own."""
    rows = [_term_row("model_weights_gib", mem.weight_bytes, facts.model_weights_gib, "'Model loading took'")]
    if facts.consumed_memory_gib is not None:
        rows.append(_term_row("consumed_memory_gib", mem.weight_bytes + mem.non_torch_bytes + mem.runner_buffer_bytes,
                              facts.consumed_memory_gib, "weights + non-torch + the model runner's request state"))
        rows.append(_term_row("peak_activation_gib", mem.activation_bytes + mem.cudagraph_bytes,
                              facts.peak_activation_gib, "the profiling run's peak + the CUDA-graph estimate"))
    elif facts.peak_activation_gib is not None:
        rows.append(_term_row("peak_activation_gib", mem.activation_bytes, facts.peak_activation_gib,
                              "the profiling run's peak"))
        rows.append(_term_row("non_torch_memory_gib", mem.non_torch_bytes, facts.non_torch_memory_gib, "non-torch"))
    return rows
