"""Weight bytes of a model under each weight format, from its parameter inventory.

Linear layers (attention projections, MLPs, experts) take the quantized format with its scales;
embeddings, the LM head, norms, biases and MoE routers stay in the model dtype, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil, prod

from kvlab.errors import KvlabError
from kvlab.models.arch import ModelArch
from kvlab.models.params import EMBEDDING, EXPERT, LINEAR, LM_HEAD, OTHER, Tensor, inventory

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class WeightFormat:
    name: str  # the family, which picks vLLM's kernels: auto, fp8, fp8-block, int8, awq, gptq, nf4
    description: str
    bits: int  # bits per quantized weight element (16/32 for unquantized)
    group_size: int = 0  # elements per scale along the input dim (AWQ/GPTQ); block edge for fp8-block

    @property
    def key(self) -> str:
        """kvlab's name for the format (WEIGHT_FORMATS' key, ServeConfig.weights): the family `name`,
        except 8-bit GPTQ, "gptq-int8" (`name` "gptq": vLLM runs both on the same kernels)."""
        return "gptq-int8" if self.name == "gptq" and self.bits == 8 else self.name

    def linear_bytes(self, t: Tensor, dtype_bytes: int) -> float:
        """Bytes of one (out, in) linear weight (times t.count), scales and zeros included."""
        n = prod(t.shape)
        out_f, in_f = t.shape
        c = t.count
        if self.name in ("auto",):
            return n * dtype_bytes * c
        if self.name == "fp8":  # per-tensor fp32 scale
            return c * (n + 4)
        if self.name == "fp8-block":  # fp32 scale per 128x128 block (DeepSeek-V3, Qwen3 FP8)
            g = self.group_size
            return c * (n + 4 * ceil(out_f / g) * ceil(in_f / g))
        if self.name == "int8":  # per-output-channel fp32 scale (W8A8)
            return c * (n + 4 * out_f)
        if self.name in ("awq", "gptq"):
            # vLLM's AWQ/GPTQ parameters (GPTQLinearMethod.create_weights): `bits`-bit weights and
            # zeros packed in int32, an fp16 scale per group and output, GPTQ's int32 g_idx per input
            packed = self.bits / 8
            groups = ceil(in_f / self.group_size)
            scales_and_zeros = groups * out_f * (2 + packed)
            g_idx = 4 * in_f if self.name == "gptq" else 0
            return c * (n * packed + scales_and_zeros + g_idx)
        if self.name == "nf4":  # bitsandbytes: 8-bit absmax per 64 values, fp32 per 256 absmax
            blocks = ceil(n / 64)
            return c * (n / 2 + blocks + 4 * ceil(blocks / 256))
        raise AssertionError(self.name)


WEIGHT_FORMATS: dict[str, WeightFormat] = {
    f.key: f
    for f in (
        WeightFormat("auto", "the checkpoint's dtype (--dtype)", 16),
        WeightFormat("fp8", "FP8 E4M3, per-tensor scale (vLLM --quantization fp8)", 8),
        WeightFormat("fp8-block", "FP8 E4M3, 128x128 block scales (DeepSeek-V3, *-FP8 checkpoints)", 8, 128),
        WeightFormat("int8", "INT8 W8A8, per-channel scale (compressed-tensors)", 8),
        WeightFormat("awq", "INT4 AWQ, group 128, fp16 scales, 4-bit zeros", 4, 128),
        WeightFormat("gptq", "INT4 GPTQ, group 128, fp16 scales, 4-bit zeros, g_idx", 4, 128),
        WeightFormat("gptq", "INT8 GPTQ (W8A16), group 128, fp16 scales, 8-bit zeros, g_idx", 8, 128),
        WeightFormat("nf4", "bitsandbytes NF4, 64-value blocks, double-quantized absmax", 4, 64),
    )
}

# `--quantization` values (vLLM's names) and kvlab aliases -> weight format.
QUANTIZATION_ALIASES = {
    None: "auto",
    "": "auto",
    "none": "auto",
    "auto": "auto",
    "fp8": "fp8",
    "fp8_per_tensor": "fp8",
    "fp8-block": "fp8-block",
    "fp8_block": "fp8-block",
    "int8": "int8",
    "w8a8": "int8",
    "awq": "awq",
    "awq_marlin": "awq",
    "int4": "awq",
    "gptq": "gptq",
    "gptq_marlin": "gptq",
    "gptq-int8": "gptq-int8",  # kvlab's: an 8-bit GPTQ checkpoint (vLLM reads the bits from it)
    "gptq_int8": "gptq-int8",
    "bitsandbytes": "nf4",
    "bnb4": "nf4",
    "nf4": "nf4",
}


def weight_format(quantization: str | None, arch: ModelArch | None = None) -> WeightFormat:
    """The weight format for a `--quantization` value; None means what the checkpoint declares."""
    if quantization is None and arch is not None and arch.quantization_config:
        return format_from_checkpoint(arch.quantization_config)
    key = quantization.lower() if isinstance(quantization, str) else quantization
    if key not in QUANTIZATION_ALIASES:
        names = ", ".join(sorted(k for k in QUANTIZATION_ALIASES if k))
        raise KvlabError(f"unknown quantization {quantization!r}; use one of: {names}")
    fmt = WEIGHT_FORMATS[QUANTIZATION_ALIASES[key]]
    if arch is not None and arch.quantization_config and fmt.name != "auto":
        declared = format_from_checkpoint(arch.quantization_config)
        if declared.name != fmt.name or (fmt.key != fmt.name and declared.bits != fmt.bits):
            raise KvlabError(
                f"the checkpoint is already quantized as {declared.key}; --quantization {quantization} "
                "cannot re-quantize it (omit --quantization)"
            )
        return declared  # vLLM takes the bits and group size from the checkpoint
    return fmt


def format_from_checkpoint(qc: dict) -> WeightFormat:
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        block = qc.get("weight_block_size")
        if block:
            return WeightFormat("fp8-block", WEIGHT_FORMATS["fp8-block"].description, 8, int(block[0]))
        return WEIGHT_FORMATS["fp8"]
    if method in ("awq", "gptq"):
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        # vLLM: AWQ is 4-bit only; GPTQ's Marlin/Machete kernels take 4 and 8 bits
        if bits not in ((4,) if method == "awq" else (4, 8)):
            raise KvlabError(f"{method} checkpoint with {bits}-bit weights is not modelled "
                             f"({'4-bit only' if method == 'awq' else '4 or 8 bits'})")
        base = WEIGHT_FORMATS["gptq-int8" if bits == 8 else method]
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        return WeightFormat(base.name, base.description, bits, group if group > 0 else 1 << 30)
    if method == "bitsandbytes":
        return WEIGHT_FORMATS["nf4"]
    if method == "compressed-tensors":
        return WEIGHT_FORMATS["int8"]
    raise KvlabError(f"checkpoint quantization {method!r} is not modelled")


def weight_bytes_by_role(arch: ModelArch, fmt: WeightFormat, dtype: str | None = None) -> dict[str, float]:
    """Bytes of all weights (one copy) per role of `kvlab.models.params`: linear, expert (the
    format's scales and zeros included), embedding, lm_head, other (norms, biases, routers). Exact:
    every value is a whole or half byte count (4-bit formats), so the sum does not depend on order."""
    return tensor_bytes_by_role(inventory(arch), fmt, DTYPE_BYTES[dtype or arch.dtype])


# vLLM pads an embedding's and an LM head's vocabulary rows to a multiple of 64
# (vllm/model_executor/layers/vocab_parallel_embedding.py, DEFAULT_VOCAB_PADDING_SIZE, `pad_vocab_size`).
VOCAB_PADDING = 64


def tensor_bytes_by_role(tensors: list[Tensor], fmt: WeightFormat, dtype_bytes: int) -> dict[str, float]:
    """Bytes of these tensors per role as vLLM allocates them: linear and expert weights in `fmt`,
    the rest in the dtype, vocabulary rows padded to VOCAB_PADDING."""
    out = dict.fromkeys((LINEAR, EXPERT, EMBEDDING, LM_HEAD, OTHER), 0.0)
    for t in tensors:
        if t.role in (LINEAR, EXPERT) and len(t.shape) == 2:
            out[t.role] += fmt.linear_bytes(t, dtype_bytes)
        elif t.role in (EMBEDDING, LM_HEAD) and len(t.shape) == 2:
            rows = -(-t.shape[0] // VOCAB_PADDING) * VOCAB_PADDING
            out[t.role] += rows * t.shape[1] * t.count * dtype_bytes
        else:
            out[t.role] += t.numel * dtype_bytes
    return out


def weight_bytes(arch: ModelArch, fmt: WeightFormat, dtype: str | None = None) -> int:
    """Total bytes of all weights (one copy, before tensor/pipeline parallel splits)."""
    return int(ceil(sum(weight_bytes_by_role(arch, fmt, dtype).values())))


def rope_cache_bytes(arch: ModelArch, dtype: str | None = None, fp32: bool = False) -> int:
    """Bytes of the cos/sin cache vLLM's rotary embedding registers as a buffer when it builds the
    model: `rope_cache_positions` rows of `rotary_width` values (the cos half and the sin half), in
    the model dtype, or fp32 where vLLM keeps it so (`rope_cache_fp32`). `get_rope` builds one per
    distinct rope (`_ROPE_DICT`), which every layer shares, and each GPU holds it whole: vLLM counts
    it in "Model loading took" (e.g. Llama-3.1-8B: 131,072 x 128 x 2 B = 32 MiB)."""
    return arch.rope_cache_positions * arch.rotary_width * (4 if fp32 else DTYPE_BYTES[dtype or arch.dtype])


# DeepSeek's YaRN rope keeps its cache in fp32 for FlashInfer's rope kernel from vLLM 0.14
# (vllm-project/vllm#30729; DeepseekScalingRotaryEmbedding.use_flashinfer, read in the 0.13.0, 0.14.0
# and 0.22-0.32 wheels): when the rotary_embedding custom op is on, on CUDA with FlashInfer, a bf16 or
# fp16 model and a 64/128/256/512 rotary head. The custom op is on when torch.compile is off
# (--enforce-eager, -O0: CompilationConfig.custom_ops "all"); compiled, vLLM defaults it off.
ROPE_FP32_FROM = (0, 14)


def rope_cache_fp32(arch: ModelArch, version: tuple[int, int], platform: str | None, torch_compile: bool,
                    dtype: str | None = None) -> bool:
    """Whether vLLM keeps this model's cos/sin cache in fp32 (ROPE_FP32_FROM); platform: "cuda",
    "rocm", or None for the CPU build."""
    return (arch.rope_type in ("deepseek_yarn", "deepseek_llama_scaling") and version >= ROPE_FP32_FROM
            and platform == "cuda" and not torch_compile and (dtype or arch.dtype) in ("bfloat16", "float16")
            and arch.rotary_width in (64, 128, 256, 512))


def mla_dequant_copy_bytes(arch: ModelArch, fmt: WeightFormat, dtype: str | None = None,
                           tensor_parallel_size: int = 1, num_layers: int | None = None) -> int:
    """Bytes of the 16-bit copy of kv_b_proj that vLLM's MLA keeps beside a quantized one: it has no
    quantized batched matmul for the absorbed up-projections, so `process_weights_after_loading`
    dequantizes kv_b_proj and keeps W_UK_T and W_UV as views of that copy ("we just store fp16/bf16
    copies", vllm/v1/attention/backends/mla/common.py in 0.11.0; `split_kv_b_proj` with
    `get_and_maybe_dequant_weights` in vllm/model_executor/layers/attention/mla_attention.py in
    0.32). Unquantized, they are views of kv_b_proj itself: nothing more (checked on the CPU build).
    Per GPU: the heads split over -tp; `num_layers` MLA layers (default all)."""
    if arch.mla is None or fmt.name == "auto":
        return 0
    m = arch.mla
    heads = arch.num_attention_heads // tensor_parallel_size
    layers = arch.num_layers if num_layers is None else num_layers
    return layers * heads * (m.qk_nope_head_dim + m.v_head_dim) * m.kv_lora_rank * DTYPE_BYTES[dtype or arch.dtype]
