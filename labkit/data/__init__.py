"""Datasets: the real folder layouts, synthetic stand-ins written in those layouts, cached tensors."""
