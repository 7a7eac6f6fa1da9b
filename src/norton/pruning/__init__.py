"""Structured pruning: criteria rank filters, the engine removes coupled channels, records replay them.

Modules: :mod:`~norton.pruning.angles` (principal angles, pairwise distances),
:mod:`~norton.pruning.criteria` (criterion objects, registry, removal order),
:mod:`~norton.pruning.groups` (tracing, coupled groups), :mod:`~norton.pruning.budget`
(widths each group keeps, the MAC model), :mod:`~norton.pruning.engine` (``prune``,
``plan_prune``), :mod:`~norton.pruning.surgery` (layer pruners) and
:mod:`~norton.pruning.plan` (records, ``replay_prune``; importing it registers the
``"prune"`` plan operation).
"""
from norton.pruning import plan as _plan  # noqa: F401  (registers the "prune" plan operation)
from norton.pruning.criteria import filter_removal_order, list_criteria, register_criterion
from norton.pruning.engine import coupled_groups, plan_prune, prune
from norton.pruning.plan import replay_prune

__all__ = [
    "coupled_groups", "filter_removal_order", "list_criteria", "plan_prune", "prune", "register_criterion",
    "replay_prune",
]
