"""Parallelism applied from outside the plain models: layout, device mesh, wrappers."""
