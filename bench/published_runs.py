"""Published real-vLLM benchmark runs (bench/published_runs.yaml): typed, validated, summarised.

The YAML holds the figures kvlab's simulated clock is checked against (issue 14, point 5): one
entry per published run with its source, configuration, workload and measured figures, the
same-GPU ratio pairs (fp8/bf16, AWQ/bf16, fp8 KV/bf16 KV, MLA), a train/test split declared
before anything was fitted, and the stated causes of the figures the simulator misses by more than
2x (`miss_causes`, named per figure by a run's `misses`). Loading checks that every id is unique,
that every ratio names two runs of one split group on one GPU, that every run's `split` is what the
declared rule gives for its `split_group` (a hand-moved row is refused), and that every miss names
a figure the run states and a stated cause.

Run: `python bench/published_runs.py [PATH]` prints the runs, ratios and stated causes as Markdown tables.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvlab.errors import KvlabError
from kvlab.io import read_mapping
from kvlab.schema import figure

PATH = Path(__file__).with_name("published_runs.yaml")
SPLIT_RULE = "test iff int(sha256(split_group.encode('utf-8')).hexdigest(), 16) % 2 == 1"
Split = Literal["train", "test"]
ID = r"^[a-z0-9][a-z0-9.-]*$"


def split_of(split_group: str) -> Split:
    """The side the declared rule puts a split group on (SPLIT_RULE)."""
    return "test" if int(hashlib.sha256(split_group.encode("utf-8")).hexdigest(), 16) % 2 == 1 else "train"


class Measured(BaseModel):
    """A run's figures as published, under `vllm bench serve`'s result names where they fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    duration_s: float | None = figure("measured", unit="s")
    request_throughput: float | None = figure("measured", unit="req/s")
    input_throughput: float | None = figure("measured", unit="tok/s")
    output_throughput: float | None = figure("measured", unit="tok/s")
    total_token_throughput: float | None = figure("measured", unit="tok/s")
    throughput_tok_s: float | None = figure("measured", unit="tok/s", description="kind (output/total) not stated")
    mean_ttft_ms: float | None = figure("measured", unit="ms")
    median_ttft_ms: float | None = figure("measured", unit="ms")
    p99_ttft_ms: float | None = figure("measured", unit="ms")
    ttft_ms: float | None = figure("measured", unit="ms", description="statistic not stated")
    mean_tpot_ms: float | None = figure("measured", unit="ms")
    median_tpot_ms: float | None = figure("measured", unit="ms")
    p99_tpot_ms: float | None = figure("measured", unit="ms")
    tpot_ms: float | None = figure("measured", unit="ms", description="statistic not stated")
    mean_itl_ms: float | None = figure("measured", unit="ms")
    median_itl_ms: float | None = figure("measured", unit="ms")
    p99_itl_ms: float | None = figure("measured", unit="ms")
    max_output_tokens_per_s: float | None = figure(
        "measured", unit="tok/s", description="the client's 'Peak output token throughput': output tokens in its busiest "
                                              "whole second")
    # A source that publishes its client's figures per GPU and in seconds (InferenceMAX's aggregated rows: its
    # utils/process_result.py divides the client's total and output throughput by the TP size and its _ms figures by
    # 1,000), under those names, as published
    total_token_throughput_per_gpu: float | None = figure("measured", unit="tok/s/GPU",
                                                          description="the client's total token throughput / GPUs")
    output_throughput_per_gpu: float | None = figure("measured", unit="tok/s/GPU",
                                                     description="the client's output throughput / GPUs")
    mean_ttft_s: float | None = figure("measured", unit="s")
    median_ttft_s: float | None = figure("measured", unit="s")
    p99_ttft_s: float | None = figure("measured", unit="s")
    mean_tpot_s: float | None = figure("measured", unit="s")
    median_tpot_s: float | None = figure("measured", unit="s")
    p99_tpot_s: float | None = figure("measured", unit="s")
    mean_itl_s: float | None = figure("measured", unit="s")
    median_itl_s: float | None = figure("measured", unit="s")
    p99_itl_s: float | None = figure("measured", unit="s")

    @model_validator(mode="after")
    def _figures_are_positive(self) -> Measured:
        if not self.figures():
            raise ValueError("states no figure")
        bad = [k for k, v in self.figures().items() if not (math.isfinite(v) and v > 0)]
        if bad:
            raise ValueError(f"figures must be positive and finite: {', '.join(bad)}")
        return self

    def figures(self) -> dict[str, float]:
        """The figures the source states, in field order."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


class ClosedLoopWindow(BaseModel):
    """A closed-loop load tester's point: its users start one after another over `ramp_s`, each
    sending its next request when the last one ends; after `warmup_s` more, one window of `window_s`
    is measured. Figures over the window: output tokens that reached the client in it, requests that
    completed in it, and latency statistics of those requests."""

    model_config = ConfigDict(extra="forbid")
    ramp_s: float = Field(ge=0)
    warmup_s: float = Field(ge=0)
    window_s: float = Field(gt=0)


class Run(BaseModel):
    """One published run: where it is, what ran, under which load, what was measured."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=ID)
    source_url: str = Field(pattern=r"^https?://")
    locator: str = Field(min_length=1)
    model: str = Field(min_length=1)
    gpu: str = Field(min_length=1)
    num_gpus: int | None = Field(ge=1)
    tp: int | None = Field(ge=1)
    vllm_version: str | None
    engine: Literal["v0", "v1"] | None
    dtype: str | None
    quantization: str | None
    kv_cache_dtype: str | None
    dataset: Literal["random", "sharegpt", "random-offline"]
    input_len: int | None = Field(ge=1)
    output_len: int | None = Field(ge=1)
    num_prompts: int | None = Field(ge=1)
    max_concurrency: int | None = Field(ge=1)
    request_rate: Annotated[float, Field(gt=0)] | Literal["inf"] | None
    seed: int | None = None  # the bench client's --seed where the source states it; absent: its default, 0
    # the bench client's --endpoint-type (--backend) where the source states openai-chat
    # (/v1/chat/completions); absent: /v1/completions, or not stated (simulated as /v1/completions)
    endpoint_type: Literal["openai-chat"] | None = None
    max_model_len: int | None = Field(default=None, ge=1)  # vllm serve flags the source states; absent: default
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    enable_expert_parallel: bool = False  # vllm serve's --enable-expert-parallel where the source's command has it
    # vllm serve's --no-enable-prefix-caching / --no-enable-chunked-prefill where the source's command has them
    # (False); absent: the release's default (both on in V1)
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    # the profiling run's top-k/top-p sampler where the source decides it: its startup log names it, or it
    # states vLLM's Docker image up to 0.11.0, which ships FlashInfer, so vLLM's V1 sampler takes it
    # (kvlab.models.budget.default_sampler); absent: kvlab's default for the release, the pip wheel's
    sampler: Literal["pytorch", "flashinfer"] | None = None
    measured: Measured
    split_group: str = Field(pattern=ID)
    split: Split
    cannot_model: str | None = None
    # runs of the same prompts the server had served before this one, not restarted (its prefix
    # cache warm): simulated as `kvlab sim bench --warm-runs N`
    warm_runs: int | None = Field(default=None, ge=1)
    # the bench client's --random-range-ratio where the source states one (lengths uniform on
    # L x [1 - r, 1 + r]); absent: the client's default (fixed lengths)
    random_range_ratio: float | None = Field(default=None, ge=0, lt=1)
    # the OLD client's --random-range-ratio r (benchmarks/benchmark_serving.py before vLLM's bench CLI, and forks of
    # it such as kimbochen/bench_serving): lengths uniform on [int(r x L), L], not on L x [1 - r, 1 + r]
    random_range_ratio_legacy: float | None = Field(default=None, gt=0, le=1)
    # vllm serve's --async-scheduling where the source's command sets it (absent: the release's default)
    async_scheduling: bool | None = None
    # the client's printed "Total input tokens" / "Total generated tokens" where the source gives them
    # (the generated total is what the replies came to: they end at EOS without ignore_eos), simulated
    # as `kvlab sim bench --total-input-tokens --total-output-tokens`
    total_input_tokens: int | None = Field(default=None, ge=1)
    total_output_tokens: int | None = Field(default=None, ge=1)
    # a closed loop of `max_concurrency` users measured in one steady-state window, where the source's
    # own load tester ran it (not `vllm bench`): simulated as those users, staggered over the ramp
    closed_loop: ClosedLoopWindow | None = None
    # figures the simulator misses by more than 2x, each with the id of its stated cause (miss_causes)
    misses: dict[str, str] = {}
    notes: str | None = None

    @model_validator(mode="after")
    def _closed_loop_has_users(self) -> Run:
        if self.closed_loop is not None and (self.max_concurrency is None or self.dataset != "random"
                                             or not self.input_len or not self.output_len):
            raise ValueError("a closed-loop window needs max_concurrency (its users) and fixed random lengths")
        return self

    @model_validator(mode="after")
    def _split_follows_rule(self) -> Run:
        if self.split != split_of(self.split_group):
            raise ValueError(f"split is {self.split!r} but the declared rule puts split_group "
                             f"{self.split_group!r} in {split_of(self.split_group)!r}")
        if self.random_range_ratio is not None and self.dataset == "sharegpt":
            raise ValueError("random_range_ratio applies to the random datasets, not sharegpt")
        if self.random_range_ratio_legacy is not None and (self.dataset == "sharegpt"
                                                           or self.random_range_ratio is not None):
            raise ValueError("random_range_ratio_legacy applies to the random datasets, in place of random_range_ratio")
        if (self.dataset == "random" and self.total_output_tokens and self.num_prompts and self.output_len
                and not self.random_range_ratio and self.total_output_tokens > self.num_prompts * self.output_len):
            raise ValueError(f"total_output_tokens {self.total_output_tokens} is more than the {self.num_prompts} "
                             f"requests of {self.output_len} output tokens ask for")
        unstated = sorted(set(self.misses) - set(self.measured.figures()))
        if unstated:
            raise ValueError(f"misses names a figure the run does not state: {', '.join(unstated)}")
        return self

    def config(self) -> str:
        gpus = f"{self.num_gpus or '?'}x {self.gpu}" + (f" tp{self.tp}" if self.tp and self.tp > 1 else "")
        weights = self.quantization or self.dtype or "?"
        version = f"vLLM {self.vllm_version or '?'}" + (f" {self.engine.upper()}" if self.engine else "")
        return f"{gpus}, {weights}, kv {self.kv_cache_dtype or '?'}, {version}"

    def workload(self) -> str:
        lengths = f" {self.input_len or '?'}/{self.output_len or '?'}" if self.dataset != "sharegpt" else ""
        if self.random_range_ratio:
            lengths += f" ±{100 * self.random_range_ratio:g} %"
        if self.random_range_ratio_legacy:
            lengths += f" (each from {100 * self.random_range_ratio_legacy:g} %)"
        load = [f"n={self.num_prompts or '?'}"]
        if self.max_concurrency:
            load.append(f"conc {self.max_concurrency}")
        if self.request_rate is not None:
            load.append(f"rate {self.request_rate}")
        if self.closed_loop is not None:
            w = self.closed_loop
            load.append(f"closed loop, ramp {w.ramp_s:g} s, window {w.window_s:g} s after {w.warmup_s:g} s")
        if self.total_input_tokens or self.total_output_tokens:  # the client's printed totals
            load.append(f"{self.total_input_tokens or '?'} in / {self.total_output_tokens or '?'} generated")
        return f"{self.dataset}{lengths}, {', '.join(load)}"


class Ratio(BaseModel):
    """Two runs on one GPU and workload that differ in one factor (a over b)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=ID)
    a: str
    b: str
    factor: str = Field(min_length=1)
    note: str | None = None


class MissCause(BaseModel):
    """Why figures are off by more than 2x: stated once, named by the runs' `misses`, and told in full
    under its heading in docs/simulator-validation.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=ID)
    doc: str = Field(min_length=1)  # the bold heading of its entry in docs/simulator-validation.md
    why: str = Field(min_length=1)  # the cause in a sentence


class PublishedRuns(BaseModel):
    """The whole file: the declared split, the runs, the ratio pairs and the stated causes of misses."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    split_rule: str
    split_declared: datetime.date
    runs: list[Run] = Field(min_length=1)
    ratios: list[Ratio] = []
    miss_causes: list[MissCause] = []

    @model_validator(mode="after")
    def _consistent(self) -> PublishedRuns:
        if self.split_rule != SPLIT_RULE:
            raise ValueError(f"split_rule must be the declared rule {SPLIT_RULE!r}")
        ids = Counter([r.id for r in self.runs] + [q.id for q in self.ratios] + [c.id for c in self.miss_causes])
        dup = sorted(i for i, n in ids.items() if n > 1)
        if dup:
            raise ValueError(f"duplicate id: {', '.join(dup)}")
        by_id = self.by_id()
        for q in self.ratios:
            missing = [i for i in (q.a, q.b) if i not in by_id]
            if missing:
                raise ValueError(f"ratio {q.id} names no run {', '.join(missing)}")
            a, b = by_id[q.a], by_id[q.b]
            if q.a == q.b or a.gpu != b.gpu or a.split_group != b.split_group:
                raise ValueError(f"ratio {q.id} must pair two runs of one GPU and one split_group")
        causes = self.causes()
        for r in self.runs:
            unknown = sorted(set(r.misses.values()) - set(causes))
            if unknown:
                raise ValueError(f"run {r.id} names no stated miss cause {', '.join(unknown)}")
        return self

    def causes(self) -> dict[str, MissCause]:
        return {c.id: c for c in self.miss_causes}

    def by_id(self) -> dict[str, Run]:
        return {r.id: r for r in self.runs}

    def test_share(self) -> float:
        return sum(r.split == "test" for r in self.runs) / len(self.runs)


def load(path: str | Path = PATH) -> PublishedRuns:
    """The validated file, or a one-line KvlabError naming the file and the first problem."""
    return validate(read_mapping(path, "the published runs"), str(path))


def validate(data: dict, where: str) -> PublishedRuns:
    """The file's mapping as typed runs, or a one-line KvlabError: `where`, the run, the problem."""
    try:
        return PublishedRuns.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise KvlabError(f"{where}: {_where(data, err['loc'])}: {err['msg'].removeprefix('Value error, ')}") from None


def _where(data: dict, loc: tuple) -> str:
    """A validation error's location, naming the run or ratio by its id."""
    if len(loc) >= 2 and loc[0] in ("runs", "ratios", "miss_causes") and isinstance(loc[1], int):
        items = data.get(loc[0]) or []
        item = items[loc[1]] if loc[1] < len(items) and isinstance(items[loc[1]], dict) else {}
        name = f"{loc[0]}[{loc[1]}] ({item.get('id', '?')})"
        return ".".join([name, *map(str, loc[2:])])
    return ".".join(map(str, loc)) or "file"


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def markdown(pub: PublishedRuns) -> str:
    """The runs, the ratio pairs and the stated causes of misses as Markdown tables, with the split's
    totals."""
    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    lines = [f"Published real-vLLM runs: {len(pub.runs)} runs, {len(pub.ratios)} ratio pairs; "
             f"test share {100 * pub.test_share():.0f} % (split declared {pub.split_declared}: {pub.split_rule})",
             "", row(["id", "model", "GPU", "config", "workload", "figures", "split"]),
             row(["---"] * 7)]
    for r in pub.runs:
        figures = ", ".join(f"{k}={_number(v)}" for k, v in r.measured.figures().items())
        split = r.split + (" (cannot model)" if r.cannot_model else "")
        lines.append(row([r.id, r.model, r.gpu, r.config(), r.workload(), figures, split]))
    lines += ["", "Ratio pairs (a/b of the figures both rows state; computed here, not published):", "",
              row(["id", "factor", "a", "b", "a/b", "split"]), row(["---"] * 6)]
    by_id = pub.by_id()
    for q in pub.ratios:
        fa, fb = by_id[q.a].measured.figures(), by_id[q.b].measured.figures()
        shared = ", ".join(f"{k} {fa[k] / fb[k]:.3f}" for k in fa if k in fb)
        lines.append(row([q.id, q.factor, q.a, q.b, shared, by_id[q.a].split]))
    named = Counter(c for r in pub.runs for c in r.misses.values())
    lines += ["", "Stated causes of figures the simulator misses by more than 2x (a run's `misses` names them):", "",
              row(["cause", "entry in docs/simulator-validation.md", "figures naming it", "why"]), row(["---"] * 4)]
    for c in pub.miss_causes:
        lines.append(row([c.id, c.doc, str(named[c.id]), c.why]))
    gpus = Counter(r.gpu for r in pub.runs)
    lines += ["", "Runs per GPU: " + ", ".join(f"{g} {n}" for g, n in gpus.most_common())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        pub = load(args[0] if args else PATH)
    except KvlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    try:
        print(markdown(pub), flush=True)
    except BrokenPipeError:  # the reader (`| head`) closed the pipe: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
