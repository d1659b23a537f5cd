"""Yi port: ``YiForCausalLM``, the remote-code name of 01-ai's first Yi checkpoints.

Yi is the Llama architecture (GQA, large ``rope_theta``); the re-published checkpoints say
``LlamaForCausalLM`` and load through the Llama port directly. The original remote-code ones named
the two per-layer norms ``ln1`` and ``ln2`` instead of ``input_layernorm`` and
``post_attention_layernorm``; this table maps those names onto the Llama port.
"""

from __future__ import annotations

from models.llama import LLAMA_WEIGHT_TABLE, LlamaForCausalLM
from models.weight_table import rule

YI_WEIGHT_TABLE = (
    rule(r"model\.layers\.(\d+)\.ln1\.weight", r"model/layers_\1/input_layernorm/weight"),
    rule(r"model\.layers\.(\d+)\.ln2\.weight", r"model/layers_\1/post_attention_layernorm/weight"),
) + LLAMA_WEIGHT_TABLE


class YiForCausalLM(LlamaForCausalLM):
    hf_weight_table = YI_WEIGHT_TABLE
