"""MLA attention from aiconfigurator's measured vLLM MLA module, for an MLA model whose attention
block no table holds (DeepSeek-V2-Lite: no q_lora, hidden 2,048).

aiconfigurator's `mla` tables time vLLM 0.24's whole `DeepseekV2MLAAttention` forward (CUDA graphs
for decode) built from DeepSeek-V3's config.json with the head count overridden to 1-128 heads
(aiconfigurator `collector/vllm/collect_mla_module.py`): its projections (fused_qkv_a_proj 7,168 ->
2,112, q_a_layernorm, q_b_proj, kv_a_layernorm, o_proj 16 x 128 -> 7,168; in prefill also kv_b_proj)
and, between them, vLLM's MLA attention: the rotary embedding, the latent cache write, decode's
absorbed W_UK/W_UV batched products and the attention kernel (FLASH_ATTN_MLA with a bf16 cache,
FLASHMLA with an FP8 one; FlashAttention for long prefills). At V2-Lite's 16 heads that attention is
V2-Lite's own: the same latent (512 + 64 rope), the same 128 + 64 query and 128 value head dims. So
the part of the module that is not DeepSeek-V3's projections, `module - projections` (the
projections from the GEMM tables at DeepSeek-V3's shapes, `gemm_tables.gemm_seconds`), prices
V2-Lite's attention, and V2-Lite's own projections come from the GEMM tables at its shapes
(`gemm_tables`). Left in the difference and not V2-Lite's: DeepSeek-V3's q_a_layernorm (one RMSNorm
over 1,536 values a token).

What it shows against the roofline (H100, 16 heads, bf16 cache): from 16k tokens of context a step
the latent is read at 91 % of HBM (the roofline's 90 % then; 80 % since session 42), but each layer
carries a floor the roofline has no term for: 63 us at one decode row, 105 us at 256, 171 us at 1,024 (launches, norms, the
rotary embedding, the cache write, the batched products); in prefill it is 1.3-11x the roofline's
attention time for one prompt of 8k down to 1k tokens (more for shorter ones: per-token work on 16
heads x 192 values), under it from 16k-token prompts. An FP8 cache (FLASHMLA) reads the latent at
86 % of the H100's HBM (66 % of the H200's) on a floor 26-45 us higher.
Checked against a FlashMLA kernel timing nobody here wrote (tests/test_sim_mla_module.py).

- decode: the module's generation rows at (decode rows, their mean context), interpolated by the
  estimator (`MLAModule`, evaluated as `engine._evaluate_single_op` does it), memoised per (rows, context bucket
  of 1/64 octave), linear inside a bucket; decode rows' kv_b_proj is then not a GEMM of its own
  (the batched products are in the module);
- prefill: chunks of the same (new, cached) as one batch of the module's context rows at new + cached
  tokens, times aiconfigurator's own prefix correction ((n + c)^2 - c^2) / (n + c)^2 (its rows hold
  prompts without cached context), and at least the same chunk without cache.
Only on an H100/H200 (the GPUs the composition uses, `gemm_tables.SYSTEMS`) at `-tp 1`.
"""

from __future__ import annotations

import functools
from collections import Counter

from kvlab.models.arch import ModelArch
from kvlab.sim import gemm_tables, kernels

MODULE_MODEL = "deepseek-v3"  # the card of the config.json the module rows were measured with


@functools.lru_cache(maxsize=None)
def _module_arch() -> ModelArch:  # read once: a card's arch is parsed from its config.json on each access
    from kvlab.models.cards import card
    return card(MODULE_MODEL).arch


def supports(arch: ModelArch, gpu: str, tp: int, kv: str) -> bool:
    """Whether the module rows price this model's attention: an MLA model with the module model's
    latent and head dims, its heads per rank among the rows, on an H100/H200 at -tp 1."""
    if arch.mla is None or tp != 1 or gpu not in gemm_tables.SYSTEMS or not kernels.available():
        return False
    a, m = arch.mla, _module_arch().mla
    dims = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    if any(getattr(a, d) != getattr(m, d) for d in dims):
        return False
    gen, ctx = kernels._mla_tables(gemm_tables.SYSTEMS[gpu], "bfloat16", kv)
    heads = arch.num_attention_heads
    return bool((gen.num_heads == heads).any() and (ctx.num_heads == heads).any())


@functools.lru_cache(maxsize=None)
def _projections(heads: int, context: bool) -> tuple[tuple[int, int], ...]:
    """(n, k) of the module model's projections inside its module at `heads` heads (bf16)."""
    v3 = _module_arch()
    m, h = v3.mla, v3.hidden_size
    kv_a = m.kv_lora_rank + m.qk_rope_head_dim
    shapes = [(m.q_lora_rank + kv_a, h), (heads * (m.qk_nope_head_dim + m.qk_rope_head_dim), m.q_lora_rank),
              (h, heads * m.v_head_dim)]
    if context:  # prefill decompresses the new tokens' latent: kv_b_proj
        shapes.append((heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank))
    return tuple(shapes)


@functools.lru_cache(maxsize=65536)
def projections_s(system: str, heads: int, tokens: int, context: bool) -> float:
    """Seconds of the module model's projections at `tokens` rows, from the GEMM tables (memoised: a
    step's chunks repeat the shapes of earlier steps' about two times in three)."""
    return sum(gemm_tables.piecewise_linear(gemm_tables.GRID, gemm_tables.gemm_seconds(system, "bfloat16", n, k),
                                            tokens) for n, k in _projections(heads, context))


def module_s(system: str, kv: str, heads: int, context: bool, batch: int, s: int) -> float:
    """Seconds of one measured MLA module forward: `batch` decode rows at context `s`, or `batch`
    prompts of `s` tokens (the estimator's own MLAModule op and interpolation)."""
    return _module_ms(system, kv, heads, context, batch, s) / 1e3


@functools.lru_cache(maxsize=None)
def _module_probe(system: str, kv: str, heads: int, context: bool):
    """The estimator's probe engine over `system`'s tables and the module op as its JSON: what its
    `engine._evaluate_single_op` builds on every call (an MLAModule is not an attention op, so it
    pins no lane order), built once. Loaded and tried once with fd 2 quiet (the Rust loader's notes);
    the evaluations after it print nothing, so they run without the five system calls a quiet costs."""
    from aiconfigurator_core.sdk import engine
    from aiconfigurator_core.sdk import operations as ops
    from aiconfigurator_core.sdk.common import FMHAQuantMode, GEMMQuantMode, KVCacheQuantMode

    op = ops.MLAModule("kvlab_mla_module", 1, context, heads, getattr(KVCacheQuantMode, kv), FMHAQuantMode.bfloat16,
                       GEMMQuantMode.bfloat16, native_num_heads=_module_arch().num_attention_heads)
    with kernels._quiet_stderr():
        handle = engine._probe_handle_for(gemm_tables._database(system), None)
        ops_json = engine.build_ops_json([op])
        _evaluate(handle, ops_json, context, 1, 1)
    return handle, ops_json


def _evaluate(handle, ops_json: str, context: bool, batch: int, s: int) -> float:
    """Milliseconds of the op at (batch, s), as `engine._evaluate_single_op` evaluates it (its defaults:
    no prefix, no imbalance correction)."""
    return float(handle.evaluate_ops_json(ops_json, is_context=context, batch_size=batch, s=s, prefix=0,
                                          imbalance_correction_scale=1.0, x=None)[0][1])


@functools.lru_cache(maxsize=65536)
def _module_ms(system: str, kv: str, heads: int, context: bool, batch: int, s: int) -> float:
    handle, ops_json = _module_probe(system, kv, heads, context)
    return _evaluate(handle, ops_json, context, batch, s)


def decode_core_s(system: str, kv: str, heads: int, batch: int, s: int) -> float:
    """One layer's MLA attention for `batch` decode rows at context `s`: the module less its projections."""
    return max(module_s(system, kv, heads, False, batch, s) - projections_s(system, heads, batch, False), 0.0)


def prefill_core_s(system: str, kv: str, heads: int, chunks: int, new: int, cached: int) -> float:
    """One layer's MLA attention for `chunks` prefill chunks of `new` tokens over `cached` tokens each."""
    def core(total: int) -> float:
        return max(module_s(system, kv, heads, True, chunks, total)
                   - projections_s(system, heads, chunks * total, True), 0.0)
    own = core(new)
    if not cached:
        return own
    full = new + cached
    return max(own, core(full) * (full * full - cached * cached) / (full * full))


class MlaAttention:
    """A model's MLA attention over all its layers, per step (seconds): `decode_s` for decode rows,
    `step_s` for a step's decode rows and prefill chunks. Memoised."""

    def __init__(self, arch: ModelArch, gpu: str, kv: str):
        self.system = gemm_tables.SYSTEMS[gpu]
        self.kv = kv
        self.heads = arch.num_attention_heads
        self.layers = arch.num_layers
        kernel = "FLASHMLA" if kv == "fp8" else "FLASH_ATTN_MLA"
        self.source = (f"MLA attention from aiconfigurator-core {kernels.package_version()}'s {self.system} vLLM "
                       f"{kernels.table_version(self.system)} MLA module rows ({MODULE_MODEL}'s block at "
                       f"{self.heads} heads, {kernel} decode, {kv} KV) less that block's projections (GEMM tables)")
        self._decode: dict[tuple[int, int], tuple[float, float]] = {}
        self._prefill: dict[tuple[int, int, int], float] = {}

    def decode_s(self, rows: int, kv_tokens: int) -> float:
        if rows <= 0:
            return 0.0
        s = kv_tokens / rows
        lo = max(kernels.context_bucket(s), 1)
        hit = self._decode.get((rows, lo))
        if hit is None:
            width = kernels.bucket_width(lo)
            a = decode_core_s(self.system, self.kv, self.heads, rows, lo)
            b = decode_core_s(self.system, self.kv, self.heads, rows, lo + width)
            kernels.bound_memo(self._decode)
            hit = self._decode[(rows, lo)] = (a * self.layers, (b - a) * self.layers / width)
        return hit[0] + hit[1] * (s - lo) if s > lo else hit[0]

    def chunk_s(self, chunks: int, new: int, cached: int) -> float:
        key = (chunks, new, cached)
        hit = self._prefill.get(key)
        if hit is None:
            kernels.bound_memo(self._prefill)
            hit = self._prefill[key] = self.layers * prefill_core_s(self.system, self.kv, self.heads, chunks, new,
                                                                    cached)
        return hit

    def step_s(self, decodes: int, decode_kv_tokens: int, chunks: tuple) -> float:
        groups = Counter(chunks) if len(chunks) > 1 else ({chunks[0]: 1} if chunks else {})
        return (self.decode_s(decodes, decode_kv_tokens)
                + sum(self.chunk_s(k, n, c) for (n, c), k in groups.items()))


def mla_attention(arch: ModelArch, gpu: str, tp: int, kv_cache_dtype: str) -> MlaAttention | None:
    """The MLA attention pricer for this configuration, or None where the module rows do not price it."""
    kv = kernels.KV_QUANT_MODES.get(kv_cache_dtype)
    if kv is None or not supports(arch, gpu, tp, kv):
        return None
    return MlaAttention(arch, gpu, kv)
