import os
import tempfile

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MAMBAST_QUIET", "1")
# weights tuned to a style (pipeline/style_tuning.py) go to a cache of this session's own, not the user's
os.environ.setdefault("MAMBAST_CACHE", tempfile.mkdtemp(prefix="mambast-test-cache-"))

import torch

# Two cores, often shared: one intra-op thread is both faster and reproducible here.
torch.set_num_threads(1)
