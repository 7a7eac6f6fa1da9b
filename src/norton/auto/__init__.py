"""Automatic compression: per-layer widths and decompositions chosen from data to meet a budget.

Reading order: :mod:`~norton.auto.sensitivity` (how much each layer can lose, measured),
:mod:`~norton.auto.costs` (the MACs of any choice), :mod:`~norton.auto.allocation` (the
greedy knapsack), :mod:`~norton.auto.compress` (``auto_compress``: the four steps).
"""
from norton.auto.compress import AutoReport, auto_compress

__all__ = ["AutoReport", "auto_compress"]
