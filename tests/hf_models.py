"""Tiny random Hugging Face models (transformers 5) for the tests: nothing is downloaded.

``build(name, attn)`` makes the model in eval mode; ``example(name, ...)`` its keyword inputs.
Decoders are padded on the left (as generate() pads), encoders on the right.
"""

from __future__ import annotations

import torch

transformers = __import__("pytest").importorskip("transformers")
T = transformers

_DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)  # grouped KV heads: 4 query heads, 2 KV heads
CONFIGS = {
    "bert": lambda: T.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=64),
    "roberta": lambda: T.RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=72, type_vocab_size=1,
                                       pad_token_id=1),
    "distilbert": lambda: T.DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                             max_position_embeddings=64),
    "albert": lambda: T.AlbertConfig(vocab_size=128, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64),
    "gpt2": lambda: T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                 eos_token_id=0),
    "llama": lambda: T.LlamaConfig(**_DECODER),
    "qwen2": lambda: T.Qwen2Config(**_DECODER),
    "qwen3": lambda: T.Qwen3Config(**_DECODER, head_dim=8),
    "mistral": lambda: T.MistralConfig(**_DECODER, sliding_window=4),  # a window shorter than the sequence
    "gemma2": lambda: T.Gemma2Config(**_DECODER, head_dim=8, sliding_window=4),
    "phi3": lambda: T.Phi3Config(**_DECODER, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Mixture of Experts: 4 experts, 2 per token (the experts' implementation is chosen in build())
    "mixtral": lambda: T.MixtralConfig(**_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_DECODER, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                          num_experts=4, num_experts_per_tok=2),
    "t5": lambda: T.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                             decoder_start_token_id=0),
    "vit": lambda: T.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=64),
}
DECODERS = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3")
MOE = ("mixtral", "qwen2_moe")
#: (model, attention implementation) pairs: every model but the MoE ones with sdpa and eager
#: (Gemma 2 has no sdpa).
CASES = [(name, attn) for name in CONFIGS if name not in MOE for attn in ("sdpa", "eager")
         if not (name == "gemma2" and attn == "sdpa")]


def build(name: str, attn: str = "sdpa", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    auto = T.AutoModelForCausalLM if name in DECODERS + MOE else T.AutoModelForSeq2SeqLM if name == "t5" \
        else T.AutoModel
    return auto.from_config(CONFIGS[name](), attn_implementation=attn, **kwargs).eval()


def example(name: str, batch: int = 2, seq: int = 8, pad: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    inputs = {"input_ids": torch.randint(3, 128, (batch, seq), generator=g)}
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        if name in DECODERS + MOE:
            mask[0, :3] = 0
        else:
            mask[0, -3:] = 0
    inputs["attention_mask"] = mask
    if name in ("bert", "albert"):
        inputs["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(3, 128, (batch, 5), generator=g)
    return inputs
