"""The inference engine: KV cache, sampling and continuous batching. Token ids in, token ids out; no text, no HTTP.

`Engine` is the synchronous core (`step()` = admit + prefill + one decode step for every running request);
`AsyncEngine` runs it in a background thread for the server. Importing this package imports torch.
"""

from gptforge.engine.async_engine import AsyncEngine, EngineClosed, EngineError, EngineOverloaded, RequestStream
from gptforge.engine.engine import Engine, RequestOutput
from gptforge.engine.sampling import SamplingParams

__all__ = [
    "AsyncEngine",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineOverloaded",
    "RequestOutput",
    "RequestStream",
    "SamplingParams",
]
