"""The offline replay driver (`kvlab sim run`, the planner's probes): a workload's agent sessions,
the ones Locust plays (`kvlab.loadtest`), played as users of the simulated engine (`kvlab.sim`) in
virtual time, without HTTP.

- `sessions`: the session streams (closed-loop users, open-loop arrivals) and how many sessions'
  contexts the KV cache holds at once;
- `player`: the event loop (turn arrivals, engine steps, metric scrapes, per-request records);
- `run`: `run_offline`, its summary and the run's files (requests.parquet, metrics.parquet,
  results.json);
- `cli`: `kvlab sim run`.

It sits above both: `kvlab.sim` imports nothing from `kvlab.loadtest`.
"""
