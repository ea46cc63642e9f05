"""The LIMA recipe on LLaMA-3.1 8B: `lima_small.py` (batch 64, dropout 0.2) with this model shape.

Meta's config.json: 4096 wide, 32 layers, 32 heads with 8 KV heads, SwiGLU 14,336, vocabulary 128,256, untied
embeddings, RoPE theta 500,000 scaled for a 131,072-token context (llama3: factor 8, low/high frequency
factors 1/4, pretrained at 8,192). 8.03B parameters.
"""
import ml_collections

from lima_jax.config import load_sibling

LLAMA31_ROPE = dict(rope_theta=500000.0, rope_type="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_seq_len=8192)


def get_config() -> ml_collections.ConfigDict:
    c = load_sibling(__file__, "lima_small.py")
    c.model.update(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, norm_eps=1e-05,
                   max_seq_len=131072, tie_embeddings=False, **LLAMA31_ROPE)
    # LLaMA-3.x ships a 128K-token BPE (tokenizer.json, or tiktoken's tokenizer.model), not sentencepiece: set
    # tokenizer.path to it once the Hugging Face tokenizers backend is in (docs/model.md).
    return c
