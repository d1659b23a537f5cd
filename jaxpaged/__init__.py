"""jaxpaged: paged LLM serving (PagedAttention / vLLM design) in JAX.

    from jaxpaged import LLM, SamplingParams
"""

from jaxpaged.engine_args import EngineArgs
from jaxpaged.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, Logprob, RequestOutput
from jaxpaged.sampling_params import BeamSearchParams, SamplingParams


def __getattr__(name: str):
    # LLM / LLMEngine import JAX and the model code; keep `import jaxpaged` light.
    if name == "LLM":
        from jaxpaged.llm import LLM

        return LLM
    if name == "LLMEngine":
        from jaxpaged.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(f"module 'jaxpaged' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput",
           "Logprob", "BeamSearchOutput", "BeamSearchSequence"]
