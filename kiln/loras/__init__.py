"""LoRA adapter files: checked by parsing (safetensors only), kept on disk by content hash.

The API edge downloads an adapter a request names (:mod:`kiln.api.loras`), checks it with
:func:`read_header` and adds it to the :class:`LoraStore`; the canonical request then names it by
SHA-256, and the engine (:mod:`kiln.engine.lora`) loads it from the store into the running pipeline.
"""

from kiln.loras.safetensors import MAX_HEADER_BYTES, read_header
from kiln.loras.store import LoraStore

__all__ = ["MAX_HEADER_BYTES", "LoraStore", "read_header"]
