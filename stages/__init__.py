"""The ``mtk`` command line: one module per stage, thin wrappers over the ``mtk`` library."""
