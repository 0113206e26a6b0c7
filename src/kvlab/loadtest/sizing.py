"""Prompt sizing without calibration probes (`--no-calibrate`): where the server's usage counts
cannot size prompts (a static SSE endpoint, a proxy that strips usage, a stub), token counts become
words through a local tokenizer (the model's, or a twin's: kvlab.models.twins) or a stated
tokens-per-word ratio. The counts recorded per request stay the server's, where it sends them.
"""

from __future__ import annotations

from pathlib import Path

from kvlab.errors import KvlabError
from kvlab.loadtest.render import PROBE_WORDS, Calibration, probe_messages

DEFAULT_MESSAGE_TOKENS = Calibration.message_tokens
DEFAULT_BASE_TOKENS = Calibration.base_tokens


def requested(calibrate: bool, tokenizer: str | Path | None, tokens_per_word: float | None,
              workload_sizing=None) -> tuple[str | Path | None, float | None] | None:
    """What sizes the prompts, from the flags (`kvlab load`'s and the locustfile's alike) and the
    workload's `prompt_sizing:` block (kvlab.loadtest.workload.PromptSizingSpec, where no flag
    says): None to calibrate on the server's usage, else (tokenizer, tokens_per_word), exactly one
    of them set."""
    if calibrate and (tokenizer or tokens_per_word):
        raise KvlabError("--tokenizer and --tokens-per-word size prompts without calibration: add --no-calibrate")
    if calibrate:
        return None if workload_sizing is None else (workload_sizing.tokenizer, workload_sizing.tokens_per_word)
    if bool(tokenizer) == bool(tokens_per_word):
        raise KvlabError("--no-calibrate needs one of --tokenizer PATH (the model's or a twin's local tokenizer) "
                         "or --tokens-per-word X")
    return tokenizer, tokens_per_word


def from_tokens_per_word(ratio: float) -> Calibration:
    """A stated ratio; the chat template's overhead is not known, kvlab's defaults stand in for it."""
    if not ratio > 0:
        raise KvlabError(f"--tokens-per-word must be > 0 (got {ratio:g})")
    return Calibration(tokens_per_word=float(ratio), method="tokens_per_word")


def from_tokenizer(path: str | Path) -> Calibration:
    """Count probes A, B, C (render.py) with the tokenizer in `path` (a local folder with
    tokenizer.json / tokenizer_config.json, and the chat template where it has one), as the server
    would: the same fit as the calibration on the server's usage."""
    folder = Path(path)
    if not folder.is_dir():
        raise KvlabError(f"--tokenizer {folder}: not a folder (give the model's or a twin's local folder)")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise KvlabError("--tokenizer needs the transformers package (pip install 'kvlab[cpu]'), "
                         "or use --tokens-per-word X") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
        raise KvlabError(f"--tokenizer {folder}: no tokenizer could be loaded ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None
    counts = [_count(tok, probe_messages(k)) for k in ("A", "B", "C")]
    c = Calibration.fit(*counts, probe_words=PROBE_WORDS)
    return Calibration(tokens_per_word=c.tokens_per_word, message_tokens=c.message_tokens,
                       base_tokens=c.base_tokens, method="tokenizer")


def _count(tok, messages: list[dict]) -> int:
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # a BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return len(ids)
    # no chat template: the text alone, plus kvlab's default template overhead per message
    text_tokens = sum(len(tok.encode(m["content"], add_special_tokens=False)) for m in messages)
    return round(DEFAULT_BASE_TOKENS + DEFAULT_MESSAGE_TOKENS * len(messages) + text_tokens)


def prompt_sizing(calibration: Calibration, tokenizer: str | Path | None = None) -> dict:
    """The data of kvlab.schema.load.PromptSizing for load.json."""
    how = {
        "calibrated": "measured: the server's usage.prompt_tokens on probes A, B, C",
        "tokenizer": f"computed: probes A, B, C counted with the local tokenizer {tokenizer}",
        "tokens_per_word": "stated: --tokens-per-word; the chat template's overhead is kvlab's default "
                           f"({DEFAULT_BASE_TOKENS:g} per request, {DEFAULT_MESSAGE_TOKENS:g} per message)",
    }
    return {"method": calibration.method, "tokenizer": str(tokenizer) if tokenizer else None,
            "tokens_per_word": calibration.tokens_per_word, "message_tokens": calibration.message_tokens,
            "base_tokens": calibration.base_tokens, "source": how.get(calibration.method, calibration.method)}
