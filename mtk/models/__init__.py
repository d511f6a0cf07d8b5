"""Model families: plain single-device ``nn.Module``s built from ``mtk.layers``."""
