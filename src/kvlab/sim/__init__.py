"""A simulated vLLM for GPUs you do not have: vLLM's API, metrics and startup lines, KV capacity from
kvlab's memory model, step times from a roofline on a GPU preset (`kvlab sim serve`, `kvlab sim run`)."""
