"""Poll a vLLM server's `/metrics` during a run and append every `vllm:*` sample to the samples file.

    with Scraper("http://127.0.0.1:8000", run_dir / "metrics.csv") as s:
        run_the_load()

Entering scrapes once before returning (the run's baseline); leaving scrapes once more (its end)
and stops. A failed scrape is a `kvlab:scrape_gap` row and the run goes on.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from kvlab.errors import KvlabError
from kvlab.metrics.exposition import VLLM_PREFIX, parse_exposition
from kvlab.metrics.gpu import NvidiaSmi
from kvlab.metrics.samples import GAP, GPU_ABSENT, SampleWriter

MAX_ERROR_CHARS = 300
MAX_REDIRECTS = 3


def metrics_url(url: str) -> str:
    """`http://host:port` or `http://host:port/metrics` -> the metrics URL."""
    try:
        u = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as e:
        raise KvlabError(f"not a URL: {url!r} ({e})") from None
    if u.scheme not in ("http", "https") or not u.host:
        raise KvlabError(f"not an http(s) URL: {url!r} (expected e.g. http://127.0.0.1:8000)")
    if u.path in ("", "/"):
        u = u.copy_with(path="/metrics")
    return str(u)


def redacted(url: str) -> str:
    """The URL without user:password, for records."""
    u = httpx.URL(url)
    return str(u.copy_with(username=None, password=None)) if u.userinfo else url


@dataclass(frozen=True)
class ScrapeResult:
    ts: float
    samples: int  # vllm:* samples written
    error: str | None  # why the scrape (or part of it) failed


class Scraper:
    """Polls `url` every `interval_s` seconds in a background thread, appending to `out_path`."""

    def __init__(self, url: str, out_path: str | os.PathLike, interval_s: float = 1.0, *,
                 timeout_s: float | None = None, gpu: bool | None = None, prefix: str = VLLM_PREFIX):
        if not interval_s > 0:
            raise KvlabError(f"interval_s must be positive, got {interval_s}")
        self.url = metrics_url(url)
        self.path = Path(out_path)
        self.interval_s = float(interval_s)
        # A scrape must not hold up the next one for long; vLLM answers in milliseconds.
        self.timeout_s = timeout_s if timeout_s is not None else max(1.0, min(5.0, 2 * interval_s))
        self.prefix = prefix
        self._gpu_wanted = gpu
        self.gpu: NvidiaSmi | None = None
        self.scrapes = 0
        self.gaps = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writer: SampleWriter | None = None
        self._client: httpx.Client | None = None
        self._failure: BaseException | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "Scraper":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(raise_failure=exc is None)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("Scraper already started")
        self._writer = SampleWriter(self.path)
        self._client = httpx.Client(timeout=self.timeout_s, follow_redirects=False, trust_env=False)
        self._start_gpu()
        self.scrape_once()
        self._thread = threading.Thread(target=self._loop, name="kvlab-scraper", daemon=True)
        self._thread.start()

    def stop(self, raise_failure: bool = True) -> None:
        """Scrape once more (the run's end), then stop and close the file."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._client.close()
        self._writer.close()
        if self._failure is not None and raise_failure:
            raise KvlabError(f"the scraper of {self.url} stopped early: {self._failure!r}; "
                             f"what it wrote is in {self.path}")

    def _loop(self) -> None:
        t0 = time.monotonic()
        tick = 1
        try:
            while not self._stop.wait(max(0.0, t0 + tick * self.interval_s - time.monotonic())):
                self.scrape_once()
                # Skip ticks a slow scrape overran instead of scraping back to back.
                tick = max(tick + 1, int((time.monotonic() - t0) / self.interval_s) + 1)
            self.scrape_once()
        except Exception as e:  # e.g. the disk filled: stop, and say so when the run ends
            self._failure = e

    # -- one scrape ----------------------------------------------------------------------------
    def scrape_once(self) -> ScrapeResult:
        ts = time.time()
        rows, error, kind = self._fetch_rows(ts)
        if error is not None:
            rows.append(self._gap_row(ts, kind, error))
            self.gaps += 1
            self.last_error = error
        rows += self._gpu_rows(ts)
        self._writer.append(rows)
        self.scrapes += 1
        n = sum(1 for r in rows if r[1].startswith(self.prefix))
        return ScrapeResult(ts, n, error)

    def _get(self) -> httpx.Response:
        """GET the metrics URL, following redirects on the same host and port only (vLLM sends
        /metrics to /metrics/); one elsewhere is answered as it is, not followed."""
        resp = self._client.get(self.url)
        origin = (resp.request.url.scheme, resp.request.url.host, resp.request.url.port)
        for _ in range(MAX_REDIRECTS):
            nxt = resp.next_request
            if nxt is None or (nxt.url.scheme, nxt.url.host, nxt.url.port) != origin:
                break
            resp = self._client.send(nxt)
        return resp

    def _fetch_rows(self, ts: float) -> tuple[list, str | None, str]:
        try:
            resp = self._get()
        except httpx.HTTPError as e:
            return [], f"{type(e).__name__}: {e}", "unreachable"
        if resp.next_request is not None:
            u = httpx.URL(self.url)
            return [], (f"redirected to {redacted(str(resp.next_request.url))}: not followed (scrapes go only to "
                        f"{u.host}:{u.port})"), "redirect"
        if resp.status_code != 200:
            return [], f"HTTP {resp.status_code}", "http_status"
        parsed = parse_exposition(resp.text, self.prefix)
        rows = [(ts, s.family, s.name, s.labels, s.value) for s in parsed.samples]
        if parsed.errors:
            return rows, "; ".join(parsed.errors), "parse"
        if not rows:
            return rows, f"no {self.prefix}* samples in the response", "no_samples"
        return rows, None, ""

    def _gap_row(self, ts: float, kind: str, error: str):
        labels = {"url": redacted(self.url), "kind": kind, "error": error[:MAX_ERROR_CHARS]}
        return (ts, GAP, GAP, labels, 1.0)

    # -- GPU telemetry -------------------------------------------------------------------------
    def _start_gpu(self) -> None:
        if self._gpu_wanted is False:
            return
        self.gpu = NvidiaSmi()
        if not self.gpu.available:
            self._writer.append([(time.time(), GPU_ABSENT, GPU_ABSENT, {"reason": self.gpu.absent_reason}, 1.0)])

    def _gpu_rows(self, ts: float) -> list:
        if self.gpu is None or not self.gpu.available:
            return []
        try:
            return self.gpu.sample(ts)
        except RuntimeError as e:
            return [(ts, GAP, GAP, {"source": "nvidia-smi", "kind": "gpu", "error": str(e)[:MAX_ERROR_CHARS]}, 1.0)]
