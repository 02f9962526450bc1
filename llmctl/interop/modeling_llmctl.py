"""transformers model type `llmctl`: any llmctl model, loaded with trust_remote_code=True.

`llmctl export --format remote` copies this file beside the weights. It holds no model code:
it builds the installed llmctl package's own `LLM` from the config, so the exported model is
exactly the one llmctl trains and samples (pip install llmctl where the folder is loaded)."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

from llmctl.config.loader import load_config
from llmctl.model import LLM
from llmctl.model.cache import KVCache


class LlmctlConfig(PretrainedConfig):
    model_type = "llmctl"

    def __init__(self, llmctl_model: dict | None = None, llmctl_layers: list | None = None,
                 **kwargs):
        self.llmctl_model = llmctl_model or {}
        self.llmctl_layers = llmctl_layers or []
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    def llm_config(self):
        run = load_config({"model": dict(self.llmctl_model), "layers": list(self.llmctl_layers)},
                          check_batch_split=False)
        return run.model


class LlmctlForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LlmctlConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.lm_head.weight": "model.wte.weight"}
    _supports_sdpa = True

    def __init__(self, config: LlmctlConfig):
        super().__init__(config)
        self.model = LLM(config.llm_config())
        self.post_init()

    def _init_weights(self, module):  # LLM initialises itself; loading overwrites it
        pass

    def get_input_embeddings(self):
        return self.model.wte

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of every position. During generation `past_key_values` is llmctl's own
        KVCache (see prepare_inputs_for_generation), so decoding follows `llmctl sample`
        step for step: prefill, one token per step, and cache-less on the cropped context
        once the window is full."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("llmctl models take unpadded batches (attention_mask all ones)")
        block = self.model.config.block_size
        cache = _llmctl_cache(cache, past_key_values)  # transformers 5 names it cache
        if labels is not None or not use_cache:
            logits = self.model(input_ids[:, -block:], use_cache=False).logits  # (B, T, V)
        elif cache is not None and cache.length >= block:  # full: recompute, keep the marker
            logits = self.model(input_ids[:, -block:], use_cache=False).logits
        else:
            out = self.model(input_ids[:, -block:], kv_cache=cache, use_cache=True)
            logits, cache = out.logits, out.kv_cache
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                labels[:, -block:][:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      past_key_values=cache if use_cache else None)

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None,
                                      attention_mask=None, use_cache=True, **kwargs):
        cache = _llmctl_cache(cache, past_key_values)
        if cache is not None and cache.length < self.model.config.block_size:
            input_ids = input_ids[:, -1:]  # the cache holds everything before the new token
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache}


def _llmctl_cache(*candidates):
    """llmctl's KVCache among the arguments; transformers' own (empty) caches are ignored."""
    return next((c for c in candidates if isinstance(c, KVCache)), None)
