import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MAMBAST_QUIET", "1")

import torch

# Two cores, often shared: one intra-op thread is both faster and reproducible here.
torch.set_num_threads(1)
