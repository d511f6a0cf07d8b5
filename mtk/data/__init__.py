"""Data: tokenizers, Megatron indexed datasets, sample indices, blends, loaders."""
