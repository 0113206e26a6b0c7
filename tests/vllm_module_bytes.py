"""Load a model folder on the installed vLLM (the CPU build) and print, as JSON, what its loaded
module holds: the bytes of its distinct tensor storages (a view, such as MLA's W_UK_T and W_UV of an
unquantized kv_b_proj, counted once) and each buffer's name, dtype and shape.
Run: python tests/vllm_module_bytes.py MODEL_DIR (tests/test_vllm_module_bytes.py does).

On some CPUs (one with AVX-512 BF16, an AMD EPYC, 2026-12-07) the CPU build repacks each linear layer's
weight into a oneDNN handle and then frees the parameter (`dispatch_cpu_unquantized_gemm(layer,
remove_weight=True)`, vllm/model_executor/layers/utils.py), so the module holds an empty tensor where a
GPU holds the weight; on others (CI's runners, where the count matched before) the parameters stay. The
script keeps them on every CPU (`remove_weight=False`), so the count is what vLLM allocates for the
model, whichever CPU runs it."""

import json
import os
import sys


def held(model):
    storages = {}
    for _name, t in list(model.named_parameters()) + list(model.named_buffers()):
        s = t.untyped_storage()
        storages[(s.data_ptr(), s.nbytes())] = True
    buffers = [(n, str(b.dtype).removeprefix("torch."), list(b.shape)) for n, b in model.named_buffers()]
    return {"storage_bytes": sum(nbytes for _ptr, nbytes in storages), "buffers": buffers}


if __name__ == "__main__":  # vLLM spawns workers: the entry point must be guarded
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model in this process
    from vllm import LLM
    from vllm.model_executor.layers import utils as layer_utils

    _dispatch = layer_utils.dispatch_cpu_unquantized_gemm  # linear.py imports it at each call

    def _keep_weight(layer, remove_weight):
        return _dispatch(layer, remove_weight=False)

    layer_utils.dispatch_cpu_unquantized_gemm = _keep_weight

    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, max_model_len=1024, skip_tokenizer_init=True)
    (result,) = llm.apply_model(held)
    print("RESULT " + json.dumps(result))
