"""Generation: prefill and decode steps, sampling, KV caches, speculative decoding."""

from edgelm.errors import GenerationError

KV_BITS = (32, 16, 8, 4)  # --kv-bits: float32 and float16 caches, int8 and int4 quantized ones
KV_GROUP = 32  # channels per scale and zero point of an 8-/4-bit cache (the head, when it is narrower)


def check_kv_bits(bits: int | None) -> None:
    """A --kv-bits value (None: float32) or a GenerationError that lists the valid ones."""
    if bits not in (None, *KV_BITS):
        raise GenerationError(f"--kv-bits must be one of {', '.join(map(str, KV_BITS))}, got {bits}")
