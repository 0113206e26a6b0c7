"""vLLM's Prometheus metrics: parse, scrape during a run, and turn into per-run figures.

- `exposition`: text exposition -> tidy samples; vLLM's renamed families in one table.
- `scraper.Scraper`: polls /metrics beside a run into `metrics.csv` (`samples`).
- `figures.summarize`: the run's figures in absolute units (`RunFigures`).
- `promql.summarize_from_prometheus`: the same figures from an existing Prometheus.
- `gpu`: nvidia-smi telemetry sampled beside the scrape.
"""
