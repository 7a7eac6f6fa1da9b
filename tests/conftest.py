"""Test-wide settings.

Tests use tiny models whose convolutions are too small to gain from intra-op
threads; one thread avoids oversubscription when test processes (or a DDP
test's workers) share the CI machine's two cores.
"""
import torch

torch.set_num_threads(1)
