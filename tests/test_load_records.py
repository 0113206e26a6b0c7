"""Per-request records, goodput, summaries and load shapes."""

import json

import pandas as pd
import pytest

import kvlab.loadtest
from kvlab.errors import KvlabError
from kvlab.loadtest.records import COLUMNS, RecordWriter, RequestRecord, read_requests, write_parquet
from kvlab.loadtest.shapes import ShapePlan, ShapeSpec, ladder
from kvlab.loadtest.slo import goodput
from kvlab.loadtest.summary import summarize


def rec(start_ts, session="s0", turn=0, turns=2, ttft=0.5, itl=(0.05, 0.05), err=None, kind="turn", **kw):
    base = dict(start_ts=start_ts, kind=kind, probe=None if kind == "turn" else "A", session_id=session, app_id="app0", turn=turn, turns_planned=turns,
                status_code=200 if err is None else 500, error_kind=err, error_detail=None,
                ttft_s=ttft, itl_s=list(itl), tpot_s=0.05, e2e_s=(ttft or 0.0) + sum(itl), prompt_tokens=100,
                completion_tokens=len(itl) + 1, cached_tokens=64, planned_prompt_tokens=98, system_tokens=50,
                max_tokens=len(itl) + 1, finish_reason="length", chunks=len(itl) + 1, start_lag_s=None)
    base.update(kw)
    return RequestRecord(**base)


def write(folder, records):
    w = RecordWriter(folder)
    for r in records:
        w.write(r)
    return w


def test_records_round_trip_and_schema(tmp_path):
    w = write(tmp_path, [rec(10.0), rec(5.0, turn=1)])
    assert w.part_path.exists() and not w.final_path.exists()  # still being written
    df_part = read_requests(tmp_path)
    final = w.close()
    assert final.exists() and not w.part_path.exists()
    df = read_requests(tmp_path)
    assert list(df.columns) == list(COLUMNS)
    assert list(df.start_ts) == [5.0, 10.0] and df.equals(df_part)
    assert df.itl_s[0] == [0.05, 0.05] and str(df.prompt_tokens.dtype) == "Int64"
    assert df.worker[0].endswith(f":{__import__('os').getpid()}")
    # the parquet copy reads back the same
    p = write_parquet(df, tmp_path / "requests.parquet")
    back = read_requests(p)
    assert back.itl_s.tolist() == df.itl_s.tolist() and back.ttft_s.tolist() == df.ttft_s.tolist()
    assert read_requests(final).shape == (2, len(COLUMNS))


def test_a_cut_last_line_is_skipped_and_garbage_is_an_error(tmp_path):
    w = write(tmp_path, [rec(1.0)])
    w._fh.write(b'{"start_ts": 2.0, "kind": "tu')  # a crash mid-line (the file is binary)
    w._fh.flush()
    assert len(read_requests(tmp_path)) == 1
    bad = tmp_path / "requests-x-1.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(KvlabError, match="line 1 is not a JSON record"):
        read_requests(tmp_path)
    with pytest.raises(KvlabError, match="no request records"):
        read_requests(tmp_path / "missing")


def test_goodput_counts_requests_and_sessions():
    records = [
        rec(0.0, "a", 0), rec(10.0, "a", 1),  # session a: both turns meet the SLO
        rec(1.0, "b", 0), rec(11.0, "b", 1, ttft=3.0),  # b finishes, one turn misses TTFT
        rec(2.0, "c", 0, itl=(0.05, 0.3, 0.3)),  # c: ITL p95 0.3 misses; then fails
        rec(12.0, "c", 1, err="http_5xx", ttft=None, itl=()),
        rec(3.0, "d", 0),  # d: cut short by the end of the run
        rec(4.0, "e", 0, turns=1, itl=()),  # a one-token reply has no gap to judge
        rec(5.0, "f", 0, err="cancelled"),  # cancelled by the end of the run: not counted
        rec(0.5, None, -1, kind="probe"),
    ]
    df = pd.DataFrame([r.__dict__ for r in records])
    g = goodput(df, {"ttft_s": 2, "itl_p95_s": 0.1}, duration_s=30)
    assert g["requests"] == 8 and g["requests_ok"] == 7 and g["requests_met_slo"] == 5  # a0 a1 b0 d0 e0
    assert g["request_goodput_per_min"] == pytest.approx(10.0) and g["requests_per_min"] == pytest.approx(16.0)
    assert (g["sessions_finished"], g["sessions_met_slo"], g["sessions_unfinished"]) == (4, 2, 1)
    assert g["session_goodput_per_min"] == pytest.approx(4.0)
    assert g["slo"] == {"ttft_s": 2, "itl_p95_s": 0.1, "tpot_s": None, "e2e_s": None}
    assert g["slo_from"] == "workload"  # whose SLO scored it: the caller says (the runner: spec or workload)
    assert goodput(df, {"ttft_s": 2}, 30, slo_from="spec")["slo_from"] == "spec"
    # the package-level name others call
    assert kvlab.loadtest.goodput(df, {"ttft_s": 2.5, "itl_p95_s": None, "e2e_s": 0.7}, 30)["requests_met_slo"] == 5


def test_summary_of_a_run(tmp_path):
    w = write(tmp_path, [rec(0.0, "a", 0, ttft=0.1), rec(1.0, "a", 1, ttft=0.3), rec(2.0, "b", 0, turns=1, ttft=0.2),
                         rec(3.0, "c", 0, err="timeout", ttft=None, itl=()), rec(0.0, None, -1, kind="probe")])
    w.close()
    s = summarize(read_requests(tmp_path))
    assert (s["requests"], s["requests_ok"], s["probes"], s["errors"], s["sessions"]) == (4, 3, 1, {"timeout": 1}, 3)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["itl_s"]["mean"] == pytest.approx(0.05)
    assert s["prompt_tokens"] == 300 and s["cached_tokens"] == 192
    assert s["calibration_error_median"] == pytest.approx(0.02)
    json.dumps(s)  # plain JSON


def test_shapes():
    assert ladder(10) == [1, 2, 4, 8, 10] and ladder(1) == [1] and ladder(8) == [1, 2, 4, 8]
    const = ShapePlan(ShapeSpec(), users=5, duration_s=10)
    assert [const.users_at(t) for t in (0, 9.9, 10)] == [5, 5, None]
    steps = ShapePlan(ShapeSpec(kind="steps"), users=8, duration_s=40)
    assert steps.step_hold_s == 10 and [steps.users_at(t) for t in (0, 10, 25, 39, 40)] == [1, 2, 4, 8, None]
    fixed = ShapePlan(ShapeSpec(kind="steps", steps=[3, 6], step_hold_s=5), users=99, duration_s=60)
    assert [fixed.users_at(t) for t in (0, 5, 10)] == [3, 6, None] and fixed.peak_users == 6
    assert ShapePlan(ShapeSpec(kind="poisson"), 16, 30).users_at(29) == 16
    w = [float(h) for h in range(24)]  # a ramp from 0 at midnight to 23 at 23:00
    day = ShapePlan(ShapeSpec(kind="diurnal", hourly_weights=w, min_users=2, period_s=24), users=25, duration_s=48)
    assert day.users_at(0) == 2  # midnight: weight 0
    assert day.users_at(23) == 25  # 23:00 of the compressed day: the peak
    assert day.users_at(12) == 2 + round(23 * 12 / 23)  # noon
    assert day.users_at(24.5) == 2  # the second day starts over
    sched = steps.schedule()
    assert sched == [(0.0, 1), (10.0, 2), (20.0, 4), (30.0, 8)]
    with pytest.raises(ValueError, match="hourly_weights"):
        ShapeSpec(hourly_weights=[0.0] * 24)
    with pytest.raises(ValueError):
        ShapeSpec(hourly_weights=[1.0] * 23)
