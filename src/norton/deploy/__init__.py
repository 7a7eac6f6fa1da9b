"""Stage 3 of NORTON, deployment: fast equivalent forms of CPDBlocks, BatchNorm folding, timing and export."""
