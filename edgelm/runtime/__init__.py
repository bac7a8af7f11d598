"""Generation: prefill and decode steps, sampling, KV caches, speculative decoding."""

KV_BITS = (32, 16, 8, 4)  # --kv-bits: float32 and float16 caches, int8 and int4 quantized ones
