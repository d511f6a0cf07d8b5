"""mtk: pretrain large language models the Megatron-LM way, from one command."""

__version__ = "0.1.0"
