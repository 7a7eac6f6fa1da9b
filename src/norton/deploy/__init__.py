"""Stage 3 of NORTON, deployment: fast equivalent forms of CPDBlocks, BatchNorm folding, timing and export."""

from norton.deploy import inference as _inference  # noqa: F401,E402  (registers the "optimize" plan operation)
