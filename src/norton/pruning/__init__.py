"""Structured pruning: filter criteria (:mod:`norton.pruning.criteria`) and the engine (:mod:`norton.pruning.engine`)."""
