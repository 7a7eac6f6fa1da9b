"""Structured pruning: filter criteria (:mod:`norton.pruning.criteria`) and the engine (:mod:`norton.pruning.engine`)."""

from norton.pruning import plan as _plan  # noqa: F401,E402  (registers the "prune" plan operation)
