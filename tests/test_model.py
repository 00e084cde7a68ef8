"""Mamba-ST model: cached path = plain path, any frame size, determinism, scan backends agree."""
import pytest
import torch

from models.checkpoint import model_config
from models.mambast import (MambaST, MambaSTConfig, cross_merge, cross_scan, fit_style, init_weights,
                            resize_image)

TINY = dict(d_model=32, d_state=4, expand=2, decoder_channels=[16, 8, 8], n_encoder_layers=2, n_decoder_layers=2)


def tiny_model(**overrides) -> MambaST:
    torch.manual_seed(0)
    model = MambaST(MambaSTConfig(**{**TINY, **overrides}))
    init_weights(model, "mamba", seed=0)
    return model.eval()


def frames(n, h, w, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cache", ["states", "projections"])
def test_cached_path_equals_plain_path(cache):
    model = tiny_model(style_cache=cache)
    content, style = frames(3, 40, 56), frames(1, 70, 50, seed=1)
    with torch.no_grad():
        plain = model(content, style.expand(3, -1, -1, -1), seed=7)
        code = model.encode_style(style, model.token_grid(40, 56), seed=7)
        cached = model.stylize(content, code)
    assert (plain - cached).abs().max().item() <= 1e-5


def test_cached_path_matches_reference_scan():
    model = tiny_model()
    content, style = frames(2, 32, 48), frames(1, 32, 48, seed=1)
    code = model.encode_style(style, model.token_grid(32, 48), seed=3)
    fast = model.stylize(content, code)
    model.cfg.scan_backend = "ref"
    with torch.no_grad():
        ref = model(content, style.expand(2, -1, -1, -1), seed=3)
    assert (fast - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("h, w", [(37, 61), (64, 24), (8, 8), (1, 1), (5, 200), (361, 17)])
def test_any_size_comes_back_exactly(h, w):
    model = tiny_model()
    code = model.encode_style(frames(1, 99, 33), model.token_grid(h, w), seed=0)
    out = model.stylize(frames(1, h, w), code)
    assert out.shape == (1, 3, h, w)
    assert torch.isfinite(out).all()


def test_non_square_style_and_content_of_different_sizes():
    model = tiny_model()
    with torch.no_grad():
        out = model(frames(1, 48, 80), frames(1, 120, 30, seed=2), seed=0)
    assert out.shape == (1, 3, 48, 80)


def test_deterministic_for_the_same_seed_and_sensitive_to_it():
    model = tiny_model()
    content, style = frames(2, 40, 40), frames(1, 40, 40, seed=1)
    grid = model.token_grid(40, 40)
    a = model.stylize(content, model.encode_style(style, grid, seed=5))
    b = model.stylize(content, model.encode_style(style, grid, seed=5))
    c = model.stylize(content, model.encode_style(style, grid, seed=6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_untouched_by_inference():
    model = tiny_model()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.stylize(frames(1, 16, 16), model.encode_style(frames(1, 16, 16), (2, 2), seed=1))
    assert torch.equal(torch.rand(3), expected)


def test_batch_equals_frame_by_frame():
    model = tiny_model()
    content = frames(4, 24, 40)
    code = model.encode_style(frames(1, 24, 40, seed=9), model.token_grid(24, 40), seed=0)
    batched = model.stylize(content, code)
    single = torch.cat([model.stylize(content[i:i + 1], code) for i in range(4)])
    assert (batched - single).abs().max() <= 1e-6


@pytest.mark.parametrize("cache", ["states", "projections"])
def test_tokens_do_not_depend_on_the_batch_bit_for_bit(cache):
    """A frame's stylized tokens are the same bits alone or in a batch of 2 or 4 (pipeline/chunks.py cuts clips
    into batches anywhere): the readouts add up Σ_n C_n h_n per frame, not in a batched matmul."""
    model = tiny_model(style_cache=cache)
    content = frames(4, 24, 40)
    code = model.encode_style(frames(1, 24, 40, seed=9), model.token_grid(24, 40), seed=0)
    four, _ = model.stylize_tokens(content, code)
    for size in (1, 2):
        for i in range(0, 4, size):
            assert torch.equal(model.stylize_tokens(content[i:i + size], code)[0], four[i:i + size]), (size, i)


def test_style_code_grid_mismatch_is_refused():
    model = tiny_model()
    code = model.encode_style(frames(1, 16, 16), (2, 2), seed=0)
    with pytest.raises(ValueError, match="token grid"):
        model.stylize(frames(1, 32, 32), code)


def test_training_step_backpropagates_through_every_trained_part():
    model = tiny_model().train()
    out = model(frames(2, 32, 32), frames(2, 32, 32, seed=1), seed=0)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if "skip_scale2" in name or "new_ps" in name or ("encoder" in name and "in_style_proj" in name):
            continue  # in the official checkpoints, unused by the official model too
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("channels_last", [True, False])
def test_cross_scan_orders_and_cross_merge_undoes_them(channels_last):
    """Direction 0 reads tokens row-major (l = i·w + j), 1 column-major (l = j·h + i), 2 and 3 the same reversed;
    the merge puts every direction back in row-major order and sums, so merge(scan(x)) = 4·x as tokens."""
    B, C, h, w = 2, 3, 4, 5
    x = torch.arange(B * C * h * w, dtype=torch.float32).view(B, C, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seqs = cross_scan(x)
    assert seqs.shape == (B, 4, C, h * w)
    for i in range(h):
        for j in range(w):
            token = x[:, :, i, j]
            for k, l in ((0, i * w + j), (1, j * h + i), (2, h * w - 1 - (i * w + j)), (3, h * w - 1 - (j * h + i))):
                assert torch.equal(seqs[:, k, :, l], token), (i, j, k)
    merged = cross_merge(seqs, h, w)
    assert torch.equal(merged, 4 * x.flatten(2).transpose(1, 2))  # (B, L, C)


def test_channels_last_decoder_equals_the_plain_one():
    model = tiny_model()
    tokens = torch.randn(2, 5, 7, TINY["d_model"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model.decode_tokens(tokens)
        plain = model.decode(tokens.permute(0, 3, 1, 2).contiguous())
    assert fast.is_contiguous()
    assert (fast - plain).abs().max() <= 1e-5 * max(1.0, plain.abs().max().item())


@pytest.mark.parametrize("cache", ["states", "projections"])
def test_bf16_precision_is_close_to_fp32_and_every_scan_gets_fp32(cache, monkeypatch):
    """precision 'bf16' (CPU autocast here, as on CUDA): linear layers and convolutions in bf16, the scans in fp32.
    Tolerance on images in [0, 1] (std 0.33): mean |bf16 - fp32| <= 2.5/255, max <= 0.06 (measured 0.004, 0.03)."""
    import models.mambast as mambast
    from tiny_models import tiny_model as lively_tiny_model  # a decoder whose images are not flat

    fp32 = lively_tiny_model(style_cache=cache)
    bf16 = lively_tiny_model(style_cache=cache, precision="bf16")
    bf16.load_state_dict(fp32.state_dict())
    content, style = frames(2, 40, 56), frames(1, 40, 56, seed=1)
    grid = fp32.token_grid(40, 56)
    calls = []
    for name in ("selective_scan", "scan_states", "read_out_states", "mstd_readout"):
        def spy(*args, _scan=getattr(mambast, name), _name=name, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            calls.append((_name, torch.is_autocast_enabled("cpu"), {t.dtype for t in tensors}))
            return _scan(*args, **kwargs)
        monkeypatch.setattr(mambast, name, spy)
    expected = fp32.stylize(content, fp32.encode_style(style, grid, seed=2), strength=0.7)
    calls.clear()
    out = bf16.stylize(content, bf16.encode_style(style, grid, seed=2), strength=0.7)  # the identity pass too
    assert out.dtype == torch.float32
    assert (out - expected).abs().mean() <= 2.5 / 255 and (out - expected).abs().max() <= 0.06
    assert {name for name, _, _ in calls} == ({"selective_scan", "scan_states", "read_out_states"} if cache == "states"
                                              else {"selective_scan", "mstd_readout"})
    assert all(autocast and dtypes == {torch.float32} for _, autocast, dtypes in calls), calls


def test_precision_must_be_known():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        MambaSTConfig(precision="fp16")


def test_configs_build():
    official = model_config("official")
    assert (official.d_model, official.d_state, official.expand, official.patch_size) == (512, 16, 2, 8)
    assert official.dt_rank == 32
    small = model_config("small")
    assert small.d_model < official.d_model


def test_widths_bench_times_each_variant_in_one_run(capsys):
    import json

    from jobs.cli import main
    assert main(["bench", "widths", "--variants", "32,48:16-8-8,32/6", "--size", "64x48", "--runs", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(report["variants"]) == ["32", "48:16-8-8", "32/6"] and report["variants"]["32"]["ratio"] == 1.0
    assert report["variants"]["48:16-8-8"]["params_m"] != report["variants"]["32"]["params_m"]
    assert report["variants"]["32/6"]["params_m"] > report["variants"]["32"]["params_m"]  # 3 more MSTD blocks


def test_model_bench_times_a_git_revision_side_by_side(capsys):
    """`bench model --baseline REV`: the revision's models package in its own processes, beside today's."""
    import json
    import subprocess

    from jobs.cli import main
    from jobs.bench_model import REPO_ROOT
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    assert main(["bench", "model", "--config", "small", "--size", "32", "--frames", "1", "--threads", "1",
                 "--paths", "cached", "--baseline", "HEAD", "--rounds", "1", "--profile"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_path = {r["path"]: r for r in report["results"]}
    assert set(by_path) == {"cached", "baseline"} and "error" not in by_path["baseline"]
    assert by_path["cached"]["models"] == str(REPO_ROOT / "models") != by_path["baseline"]["models"]
    assert report["ratios"]["32"]["baseline_over_cached"] > 0
    for result in by_path.values():  # the stage profile: the same stages for both revisions
        stages = result["stages_cpu_ms"]
        assert {"patch embed", "content encoder", "MSTD", "CNN decoder", "  MSTD: scans + layout"} <= set(stages)
        assert stages["content encoder"] >= stages["  content encoder: linear layers"] >= 0
    assert main(["bench", "model", "--config", "small", "--size", "32", "--paths", "cached",
                 "--baseline", "no-such-rev"]) == 2
    assert capsys.readouterr().err.startswith("mambast: error: --baseline 'no-such-rev': ")


@pytest.mark.parametrize("h, w, batch", [(5, 7, 3), (2, 2, 1), (8, 3, 2), (1, 9, 1)])
def test_token_grid_scan_equals_the_cross_scanned_one(h, w, batch):
    """On the CPU in inference the SS2D scans its four directions on the token grid (models/scan_kernel_cpu.py:
    index maps instead of cross_scan's copies, the merge a sum); the cross-scanning path with the reference scan
    is its oracle, for the encoders' plain SS2D and the MSTD's cached readout."""
    from models.scan_kernel_cpu import cross_kernels
    if cross_kernels() is None:
        pytest.skip("no C compiler: the compiled loop is not built")
    model = tiny_model(style_cache="projections")
    plain = model.mamba.encoder_c.layers[0].self_attention
    cross = model.mamba.decoder.layers[0].self_attention
    g = torch.Generator().manual_seed(h * w)
    u, style = torch.randn(batch, h, w, TINY["d_model"], generator=g), torch.randn(1, h, w, TINY["d_model"], generator=g)
    with torch.no_grad():
        assert plain._on_token_grid(u)
        code = cross.encode_style(style, keep_states=False)
        on_grid = plain(u), cross.forward_cached(u, code)
        model.cfg.scan_backend = "ref"
        assert not plain._on_token_grid(u)
        reference = plain(u), cross.forward_cached(u, code)
    for fast, ref in zip(on_grid, reference):
        assert fast.shape == ref.shape == (batch, h, w, TINY["d_model"])
        assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    model.cfg.scan_backend = "auto"
    assert not plain._on_token_grid(u.requires_grad_())  # training takes the cross-scanning path (autograd)


def test_frames_do_not_depend_on_the_thread_count_bit_for_bit():
    model = tiny_model()
    content = frames(2, 40, 24)
    code = model.encode_style(frames(1, 40, 24, seed=3), model.token_grid(40, 24), seed=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model.stylize_tokens(content, code)[0]
        torch.set_num_threads(2)
        two = model.stylize_tokens(content, code)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_fit_style_keeps_the_paintings_shape_and_mirrors_it_outward():
    style = torch.rand(1, 3, 40, 20)                                 # a 1:2 portrait
    fitted = fit_style(style, (40, 96))                              # onto a wide frame: scaled 1x, mirrored
    assert fitted.shape == (1, 3, 40, 96)
    assert torch.equal(fitted[..., 38:58], style)                    # the painting itself, undistorted, centred
    assert torch.equal(fitted[..., 37], style[..., 1]) and torch.equal(fitted[..., 58], style[..., 18])  # mirrors
    columns = [fitted[..., j] for j in range(96)]                    # mirrored again where one copy is not enough:
    assert all(any(torch.equal(c, style[..., k]) for k in range(20)) for c in columns)   # every column the painting's
    tall = fit_style(torch.rand(2, 3, 30, 90), (64, 48))             # a wide one onto a tall frame: 48 px wide
    assert tall.shape == (2, 3, 64, 48)
    same = torch.rand(2, 3, 24, 32)
    assert torch.equal(fit_style(same, (48, 64)), resize_image(same, (48, 64)))   # the same shape: a plain resize
    assert fit_style(torch.rand(1, 3, 1, 50), (32, 48)).shape == (1, 3, 32, 48)    # a line of pixels: replicated
