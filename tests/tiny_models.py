"""A tiny random Mamba-ST whose pictures are not flat, for tests of the style controls, the API and live mode.

PyTorch's default conv init shrinks the signal at every layer, so the untrained CNN decoder of a tiny model
outputs one flat colour (std ~1e-4), whatever the content or style. Re-initialising the decoder's convs to keep
the variance (Kaiming, zero bias) and centring the last one on mid-grey gives outputs that vary with both, so
comparisons between outputs mean something.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from models.mambast import MambaST, MambaSTConfig, init_weights

TINY = dict(d_model=32, d_state=4, decoder_channels=[16, 8, 8], n_encoder_layers=1, n_decoder_layers=1)


def tiny_model(seed: int = 0, **overrides) -> MambaST:
    """An eval-mode MambaST with the TINY config (plus `overrides`) and a lively decoder."""
    with torch.random.fork_rng():  # the patch embedding and LayerNorms take torch's default init: seed it too, so a
        torch.manual_seed(seed)    # test's model does not depend on which tests ran before it
        model = MambaST(MambaSTConfig(**{**TINY, **overrides}))
    init_weights(model, "mamba", seed=seed)
    g = torch.Generator().manual_seed(seed)
    convs = [m for m in model.decode if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv in convs:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu", generator=g)
            conv.bias.zero_()
        convs[-1].weight.mul_(0.6)
        convs[-1].bias.fill_(0.5)
    return model.eval()
