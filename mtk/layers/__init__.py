"""Transformer building blocks shared by every model family (GPT, Llama, BERT, T5, RETRO)."""
