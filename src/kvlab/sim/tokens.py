"""Deterministic tokenization without a model tokenizer.

The simulator cannot load a model's tokenizer, so it counts tokens by one documented rule:

- Text is cut into pieces by a GPT-2-style pre-tokenizer pattern: a special token `<|...|>`, an
  English contraction, a word with its leading space, up to three digits with a leading space,
  a run of punctuation with its leading space, or whitespace.
- One piece is one token; a piece longer than `MAX_PIECE_BYTES` UTF-8 bytes is one token per
  started `MAX_PIECE_BYTES` bytes (so long random strings cost what byte-level BPE charges).
- A token's id is the CRC-32 of its bytes: the same text always gives the same ids, in every
  process, so equal leading text gives equal leading blocks and the prefix cache hits.

English prose comes out at about one token per word, close to real BPE vocabularies (Llama-3 and
DeepSeek tokenizers give 1.2-1.4 tokens per word). `usage.prompt_tokens` is exactly this count,
so a client that sizes prompts by `usage.prompt_tokens` converges in one step.

Generated text is drawn from `OUTPUT_WORDS`: short words with a leading space, each one piece, so
a reply appended verbatim to the next prompt tokenizes back to exactly the generated tokens.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

MAX_PIECE_BYTES = 8

_PIECES = re.compile(
    r"<\|[A-Za-z0-9_]{1,32}\|>"
    r"|'(?:s|t|re|ve|m|ll|d)"
    r"| ?[^\W\d_]+"
    r"| ?\d{1,3}"
    r"| ?[^\s\w]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

OUTPUT_WORDS = tuple(
    " " + w
    for w in (
        "the of and to in is it for on that with as was at by be this are from or an "
        "if not but all can has had one we you they have more will may use run test file "
        "code data fix bug call read line then next step check value type list key map "
        "load save path tool task plan done ok so now new old add set get log out"
    ).split()
)
_OUTPUT_IDS = tuple(zlib.crc32(w.encode()) for w in OUTPUT_WORDS)
_WORD_BY_ID = dict(zip(_OUTPUT_IDS, OUTPUT_WORDS))


def _piece_ids(piece: str) -> list[int]:
    data = piece.encode()
    if len(data) <= MAX_PIECE_BYTES:
        return [zlib.crc32(data)]
    return [zlib.crc32(data[i:i + MAX_PIECE_BYTES]) for i in range(0, len(data), MAX_PIECE_BYTES)]


def encode(text: str) -> list[int]:
    """Token ids of a text (see the module docstring for the rule)."""
    ids: list[int] = []
    for piece in _PIECES.findall(text):
        ids.extend(_piece_ids(piece))
    return ids


def pieces(text: str) -> list[bytes]:
    """The bytes of each token of a text: `encode(text)` is `[piece_id(p) for p in pieces(text)]`."""
    out: list[bytes] = []
    for piece in _PIECES.findall(text):
        data = piece.encode()
        out.extend(data[i:i + MAX_PIECE_BYTES] for i in range(0, len(data), MAX_PIECE_BYTES))
    return out


def piece_id(piece: bytes) -> int:
    return zlib.crc32(piece)


_STRIDE = 2654435761
# output_token(seed, i) depends on seed mod N and i mod the period: one precomputed cycle per seed residue.
_N = len(_OUTPUT_IDS)
_CYCLES = []
for _r in range(_N):
    _cycle = [_OUTPUT_IDS[(_r + i * _STRIDE) % _N] for i in range(_N)]
    _period = next(p for p in range(1, _N + 1) if _cycle[:_N - p] == _cycle[p:] and _N % p == 0)
    _CYCLES.append(_cycle[:_period])


def output_token(seed: int, position: int) -> int:
    """The id of the generated token at `position` of a request whose prompt hashes to `seed`."""
    return _OUTPUT_IDS[(seed + position * _STRIDE) % _N]


def output_tokens(seed: int, start: int, stop: int) -> list[int]:
    """`output_token(seed, i)` for i in [start, stop), by slicing the seed's cycle."""
    n = stop - start
    if n <= 0:
        return []
    cycle = _CYCLES[seed % _N]
    period = len(cycle)
    offset = start % period
    return (cycle * ((offset + n) // period + 1))[offset:offset + n]


def decode(token_ids: Sequence[int]) -> str:
    """Text of generated tokens (prompt tokens are never decoded)."""
    return "".join(_WORD_BY_ID.get(t, "") for t in token_ids)


def prompt_seed(token_ids: Sequence[int]) -> int:
    """A stable seed for a request's output: its prompt length and last tokens."""
    tail = ",".join(map(str, token_ids[-16:]))
    return zlib.crc32(f"{len(token_ids)}:{tail}".encode())


# The chat template: a ChatML-like rendering whose role markers are one token each.
def render_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    parts = [f"<|{m['role']}|>\n{content_text(m.get('content'))}<|end|>\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def content_text(content) -> str:
    """A message's text: a string, or the text parts of an OpenAI content list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")
