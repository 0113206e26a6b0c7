"""bench/sim_validation_summary.json (written by `python bench/sim_validation.py`): how far the
simulator's figures stray from published real-vLLM runs, read where a simulated figure is shown.

`error_band()` is the sentence that goes beside every simulated figure (report, planner tables,
demo): the test rows' share within ±25 % and the timing the validation ran on, where the summary
file exists in the working directory; else a pointer to the validation table in docs/simulator-validation.md.
The band adds the share of each kind of figure (throughput, TTFT, TPOT/ITL) where the summary has it.
Given the configurations shown (GPU, weights, KV dtype), it adds the test figures' share on each GPU
among them (`gpu_band`) and what the validation's same-GPU ratio rows say of each quantization factor
among them on that GPU (`ratio_band`): the published and simulated ratios to BF16, and how many came
out on the wrong side of 1."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict

from kvlab.errors import KvlabError
from kvlab.schema import Part, figure

SUMMARY_FILE = Path("bench") / "sim_validation_summary.json"
NO_SUMMARY = "validation error band: see the simulator validation table, docs/simulator-validation.md (python bench/sim_validation.py)"

# The quantization factors the ratio rows check, against BF16 weights and a BF16 KV cache.
Factor = Literal["int4 weights", "int8 weight-only", "fp8 weights", "fp8 KV cache"]
INT4_WEIGHTS = ("awq", "gptq")  # kvlab weight formats vLLM runs on its int4 kernels (Marlin or legacy)
INT8_WEIGHT_ONLY = ("gptq-int8",)  # W8A16: the same kernels at 8 bits
FP8_WEIGHTS = ("fp8", "fp8-block")
WRONG_SIDE_MARGIN = 0.02  # a published ratio this close to 1 has no side


def wrong_side(published: float, simulated: float) -> bool:
    """A simulated ratio on the other side of 1 than the published one (or at 1 where it is not);
    a published ratio within WRONG_SIDE_MARGIN of 1 has no side."""
    return abs(published - 1) >= WRONG_SIDE_MARGIN and (simulated - 1) * (published - 1) <= 0


class RatioCheck(Part):
    """One same-GPU ratio row of the validation: a quantized run's throughput over its BF16 twin's."""

    id: str
    factor: Factor
    gpu: str  # the kvlab GPU preset
    split: Literal["train", "test"]
    published: float = figure("measured", description="the published runs' throughput ratio", default=...)
    simulated: float = figure("simulated", description="the same ratio simulated (the summary's timing)", default=...)

    @property
    def wrong_side(self) -> bool:
        """Simulated on the other side of 1 than published (`wrong_side`)."""
        return wrong_side(self.published, self.simulated)


class FigureShare(Part):
    """The test figures of one group (a GPU preset, or a kind of figure) and how many came within ±25 %."""

    within: int = figure("computed", description="test figures within ±25 % of the published", default=...)
    of: int = figure("computed", description="test figures in the group", default=...)
    median_abs_error: float = figure("computed", description="median |simulated / published - 1|", default=...)

    @property
    def share(self) -> float:
        return self.within / self.of if self.of else 0.0


# The kinds of figure the validation scores, as the band names them.
FIGURE_KINDS = {"throughput": "throughput", "ttft": "TTFT", "tpot": "TPOT/ITL"}


class SimValidationSummary(Part):
    """The headline of the validation table and its same-GPU ratio rows (other keys are ignored)."""

    model_config = ConfigDict(extra="ignore")
    test_within_25pct_share: float  # share of the test rows' figures within ±25 % of the measured
    timing: str  # the timing the validation ran on
    test_figures: int | None = None
    test_over_2x: int | None = None  # test figures off by more than 2x (the summary's timing)
    test_over_2x_without_cause: int | None = None  # of them, those no stated cause names
    by_timing: dict[str, dict[str, int]] = {}  # timing -> {"within": n, "of": m}, test rows
    by_gpu: dict[str, FigureShare] = {}  # GPU preset -> its test figures (the summary's timing)
    by_figure: dict[str, FigureShare] = {}  # FIGURE_KINDS key -> its test figures (the summary's timing)
    ratios: list[RatioCheck] = []


def summary_paths() -> list[Path]:
    """Where the summary is looked for: the working directory's bench/ (a checkout's root, where
    `make demo` and bench/sim_validation.py run; kvlab looks for nothing outside its package)."""
    return [Path.cwd() / SUMMARY_FILE]


def read_summary() -> SimValidationSummary | None:
    """The first summary file found, or None; one that is there but unreadable raises KvlabError."""
    import json

    from pydantic import ValidationError

    for path in summary_paths():
        if not path.is_file():
            continue
        try:
            return SimValidationSummary.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, ValidationError) as e:
            first = str(e).splitlines()[0]
            raise KvlabError(f"{path}: not a simulator validation summary ({first})") from None
    return None


def config_factors(weights: str | None, kv_cache_dtype: str | None) -> list[str]:
    """The ratio-row factors a configuration differs from BF16 by (kvlab weight format, KV dtype)."""
    out = []
    if weights in INT4_WEIGHTS:
        out.append("int4 weights")
    elif weights in INT8_WEIGHT_ONLY:
        out.append("int8 weight-only")
    elif weights in FP8_WEIGHTS:
        out.append("fp8 weights")
    if kv_cache_dtype and kv_cache_dtype.startswith("fp8"):
        out.append("fp8 KV cache")
    return out


def ratio_band(summary: SimValidationSummary, gpu: str, factor: str) -> str:
    """What the validation's ratio rows say of `factor` against BF16 on `gpu`, in words."""
    rows = [r for r in summary.ratios if r.gpu == gpu and r.factor == factor]
    if not rows:
        return f"{factor} vs BF16 on {gpu}: no published same-GPU ratio in the validation"
    pub = sorted(r.published for r in rows)
    sim = sorted(r.simulated for r in rows)
    wrong = sum(r.wrong_side for r in rows)

    def span(v: list[float]) -> str:
        return f"{v[0]:.2f}" if v[0] == v[-1] else f"{v[0]:.2f}-{v[-1]:.2f}"

    return (f"{factor} vs BF16 on {gpu}: published throughput ratio{'s' if len(rows) > 1 else ''} {span(pub)}, "
            f"simulated {span(sim)} ({len(rows)} row{'s' if len(rows) > 1 else ''}"
            + (f", {wrong} on the wrong side of 1)" if wrong else ")"))


def error_band(configs: Iterable[tuple[str | None, str | None, str | None]] = ()) -> str:
    """The validation error band, in words, for a simulated figure's label; with `configs` (GPU
    preset, kvlab weight format, KV dtype) of the figures shown, the ratio rows' word on each
    quantization factor among them, on its GPU."""
    s = read_summary()
    if s is None:
        return NO_SUMMARY
    band = (f"validation: {s.test_within_25pct_share:.0%} of test figures within ±25 % of published vLLM runs "
            f"(timing {s.timing}; bench/sim_validation.py)")
    if s.by_figure:
        band += " — " + ", ".join(f"{FIGURE_KINDS.get(k, k)} {v.share:.0%}" for k, v in s.by_figure.items())
    if s.test_over_2x is not None and s.test_figures:
        uncaused = s.test_over_2x_without_cause
        band += (f"; {s.test_over_2x} of {s.test_figures} off by more than 2x"
                 + (", each with a stated cause" if uncaused == 0 and s.test_over_2x
                    else f", {uncaused} without a stated cause" if uncaused else ""))

    def text(v) -> str | None:  # table cells may be NaN where a record has no value
        return v if isinstance(v, str) and v else None

    configs = [(text(gpu), text(weights), text(kv)) for gpu, weights, kv in configs]
    gpus = sorted({gpu for gpu, _, _ in configs if gpu}) if s.by_gpu else []
    pairs = sorted({(gpu, f) for gpu, weights, kv in configs if gpu for f in config_factors(weights, kv)})
    return "; ".join([band] + [gpu_band(s, gpu) for gpu in gpus] + [ratio_band(s, gpu, f) for gpu, f in pairs])


def gpu_band(summary: SimValidationSummary, gpu: str) -> str:
    """What the validation's test figures say of `gpu`, in words."""
    g = summary.by_gpu.get(gpu)
    if g is None or not g.of:
        return f"{gpu}: no published test run in the validation"
    return (f"{gpu}: {g.within} of {g.of} test figures within ±25 % ({g.share:.0%}), "
            f"median error {g.median_abs_error:.0%}")
