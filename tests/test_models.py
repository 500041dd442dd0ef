"""Behaviour of the models: sizes, shapes, ranges, input checks, loading the reference audio
encoder's state dict, BatchNorm folding, and a SyncNet that can learn. CPU, well under a minute.

    /work/venv/bin/python -m pytest -q tests/test_models.py
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from syncnet_model import SYNC_WIDTHS, SyncNet, sync_logits
from unet_328 import WIDTHS, AudioEncoder, StridedDepthwise, UNet328, count_params, fold_bn

# Face-tower widths for the training test: tiny, so its steps take a fraction of a second.
TINY_SYNC = (8, 8, 16, 16, 32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomise_bn(model):
    """Give every BatchNorm non-trivial statistics and affine terms, as after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def unet_inputs(b=1):
    return torch.rand(b, 6, 320, 320), torch.randn(b, 32, 16, 16)


# ---- sizes -----------------------------------------------------------------------------------
def test_param_counts_match_the_reference_design():
    full, light = UNet328(WIDTHS["full"]), UNet328(WIDTHS["light"])
    assert abs(count_params(full) - 12.2e6) < 0.05 * 12.2e6
    audio = count_params(full.audio_branch)
    assert abs(audio - 3.9e6) < 0.05 * 3.9e6
    assert abs(count_params(full) - audio - 8.3e6) < 0.05 * 8.3e6
    assert count_params(light) < count_params(full) / 3
    assert abs(count_params(AudioEncoder()) - 2.8e6) < 0.05 * 2.8e6


def test_narrow_preset_is_light_with_half_the_top_level():
    """--widths narrow (budget A's CPU recipe): light's widths but the first; with the s2d stem
    that halves the 160 px level (16 channels, not 32), the same bottleneck and audio branch."""
    narrow, light = (UNet328(WIDTHS[w], stem="s2d") for w in ("narrow", "light"))
    assert WIDTHS["narrow"][1:] == WIDTHS["light"][1:] and WIDTHS["narrow"][0] < WIDTHS["light"][0]
    assert narrow.inc.block[1].conv[-1].num_features == 16 and light.inc.block[1].conv[-1].num_features == 32
    assert count_params(narrow.audio_branch) == count_params(light.audio_branch)
    assert 0.8 * count_params(light) < count_params(narrow) < count_params(light)
    with torch.no_grad():
        y = narrow.eval()(*unet_inputs(1))
    assert y.shape == (1, 3, 320, 320) and 0 < y.min() and y.max() < 1


# ---- shapes, ranges, input checks ------------------------------------------------------------
def test_unet_output_shape_and_range():
    # The light preset runs the same code as full at a quarter of the cost.
    with torch.no_grad():
        y = UNet328(WIDTHS["light"]).eval()(*unet_inputs(2))
    assert y.shape == (2, 3, 320, 320)
    assert 0 < y.min() and y.max() < 1


def test_audio_film_starts_as_the_plain_unet_then_lets_the_audio_shape_every_decoder_level():
    """--audio_film: a 1 x 1 projection of the audio branch's map scales and shifts each decoder level.
    Zero at the start, so the U-Net paints exactly what the plain one with the same weights does; it
    learns (its projections leave zero), and BatchNorm folding keeps it."""
    plain, film = UNet328(WIDTHS["light"], stem="s2d4l"), UNet328(WIDTHS["light"], stem="s2d4l", audio_film=True)
    missing, unexpected = film.load_state_dict(randomise_bn(plain).state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("film.") for k in missing)
    assert [f.out_channels for f in film.film] == [2 * u.conv.block[-1].conv[-1].num_features for u in film.up]
    img, audio = unet_inputs(2)
    with torch.no_grad():
        assert torch.equal(film.eval()(img, audio), plain(img, audio))
    opt = torch.optim.Adam(film.train().parameters(), 1e-2)
    for _ in range(3):
        opt.zero_grad()
        F.l1_loss(film(img, audio), img[:, :3].flip(-1)).backward()
        opt.step()
    assert all(f.weight.abs().sum() > 0 for f in film.film)
    film.eval()
    with torch.no_grad():
        y = film(img, audio)
        assert torch.allclose(fold_bn(film)(img, audio), y, atol=1e-5)
        for f in film.film:
            f.weight.zero_()
            f.bias.zero_()
        assert (film(img, audio) - y).abs().mean() > 1e-4      # what it learnt there changes the painting


@pytest.mark.parametrize("stem, top", [("s2d", 160), ("s2d4", 80), ("s2d4l", 80)])
def test_s2d_stems_run_every_level_at_a_lower_resolution_and_paint_whole_pixels(stem, top):
    """--stem s2d: 2 x 2 pixels folded into channels, so the first level is 160 px (not 320); s2d4:
    4 x 4, 80 px (s2d4l: its 80 px blocks without expansion). The bottleneck stays 10 px (a window's
    cells line up as with conv), and the output is painted per pixel (sub-pixel convolution), not
    upsampled; BatchNorm folding keeps it; it learns."""
    m = UNet328(WIDTHS["light"], stem=stem)
    assert abs(count_params(m) - count_params(UNet328(WIDTHS["light"]))) < 0.02 * count_params(m)
    sizes = []
    m.inc.register_forward_hook(lambda mod, i, o: sizes.append(tuple(o.shape)))
    m.down[-1].register_forward_hook(lambda mod, i, o: sizes.append(tuple(o.shape)))
    img, audio = unet_inputs(2)
    with torch.no_grad():
        y = randomise_bn(m)(img, audio)
        win = m(img[:, :, 64:256, 32:288], audio, (64, 32))
    assert sizes[:2] == [(2, 32, top, top), (2, 256, 10, 10)]
    top_convs = [b.conv[0] for b in (*m.inc.block, m.down[0].block[0], *m.up[-1].conv.block)]   # 1x1 expansions at the top level
    assert all((c.out_channels == c.in_channels) == (stem == "s2d4l") for c in top_convs)
    assert y.shape == (2, 3, 320, 320) and 0 < y.min() and y.max() < 1
    f = 320 // (2 * top)
    assert (y[..., 0::2 * f, 0::2 * f] - y[..., 2 * f - 1::2 * f, 2 * f - 1::2 * f]).abs().mean() > 1e-3   # a block's sub-pixels differ
    assert win.shape == (2, 3, 192, 256)
    assert (win[..., 48:-48, 48:-48] - y[..., 112:208, 80:240]).abs().max() < 0.05   # a window's centre: as in the whole crop
    with torch.no_grad():
        assert torch.allclose(fold_bn(m)(img, audio), y, atol=1e-5)
    target = img[:, :3].flip(-1)
    opt = torch.optim.Adam(m.train().parameters(), 1e-2)
    losses = []
    for _ in range(4):
        loss = F.l1_loss(m(img, audio), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="stem"):
        UNet328(WIDTHS["light"], stem="s4d")


def test_base_ref_starts_from_the_reference_in_the_hole_and_learns_a_change():
    ref = torch.rand(2, 3, 320, 320) * 0.6 + 0.2
    gain, offset = torch.tensor([0.7, 1.2, 1.0]).view(1, 3, 1, 1), torch.tensor([0.1, -0.1, 0.05]).view(1, 3, 1, 1)
    lit = ref * gain + offset                                  # the same face in another light
    masked = lit.clone()
    masked[:, :, 150:300, 80:240] = 0                          # the hole the generator repaints
    audio = torch.randn(2, 32, 16, 16)
    m = UNet328(WIDTHS["light"], base="ref").eval()
    with torch.no_grad():
        y = m(torch.cat([ref, masked], 1), audio)
    hole = torch.zeros(320, 320, dtype=torch.bool)
    hole[150:300, 80:240] = True
    # untrained: the reference's pixels in the hole, in the current frame's colours; the rest is the frame
    assert (y[:, :, hole] - lit[:, :, hole]).abs().max() < 0.01
    assert (y[:, :, ~hole] - masked[:, :, ~hole]).abs().max() < 1e-5
    assert (ref[:, :, hole] - lit[:, :, hole]).abs().mean() > 0.04    # the raw reference would be visibly off
    target = torch.cat([ref, masked], 1)[:, :3].flip(-1)       # something else to learn: one step moves it
    opt = torch.optim.Adam(m.train().parameters(), 1e-2)
    losses = []
    for _ in range(3):
        loss = F.l1_loss(m(torch.cat([ref, masked], 1), audio), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[2] < losses[0]
    folded = fold_bn(randomise_bn(m))                          # BN folding keeps the base
    with torch.no_grad():
        assert torch.allclose(folded(torch.cat([ref, masked], 1), audio), m(torch.cat([ref, masked], 1), audio), atol=1e-5)
    with pytest.raises(ValueError, match="base"):
        UNet328(WIDTHS["light"], base="template")


@pytest.mark.parametrize("img_shape, audio_shape", [
    ((1, 6, 328, 328), (1, 32, 16, 16)),   # the full crop instead of its 320 centre
    ((1, 3, 320, 320), (1, 32, 16, 16)),   # reference crop missing
    ((1, 6, 320, 320), (1, 16, 32, 16)),   # audio features in the wrong layout
])
def test_unet_rejects_wrong_input_sizes(img_shape, audio_shape):
    with pytest.raises(ValueError, match="expected shape"):
        UNet328(WIDTHS["light"])(torch.rand(img_shape), torch.rand(audio_shape))


def test_audio_encoder_shape_and_input_check():
    enc = AudioEncoder().eval()
    assert enc(torch.randn(3, 1, 80, 16)).shape == (3, 512)
    with pytest.raises(ValueError, match="AudioEncoder mel"):
        enc(torch.randn(3, 80, 16))


# ---- reference weights -----------------------------------------------------------------------
def test_audio_encoder_keys_follow_wav2lip_layout():
    keys = AudioEncoder().state_dict().keys()
    assert "audio_encoder.0.conv_block.0.weight" in keys
    assert "audio_encoder.0.conv_block.1.running_mean" in keys
    assert "audio_encoder.12.conv_block.1.bias" in keys
    assert not any(k.startswith("audio_encoder.13.") for k in keys)


def test_audio_encoder_loads_reference_style_state_dicts():
    src = randomise_bn(AudioEncoder())
    mel = torch.randn(4, 1, 80, 16)
    with torch.no_grad():
        want = src(mel)
    own = src.state_dict()
    bare = {k[len("audio_encoder."):]: v for k, v in own.items()}   # audio_visual_encoder.pth
    syncnet = {"face_encoder.0.conv_block.0.weight": torch.zeros(32, 15, 7, 7),
               **{"audio_encoder." + k: v for k, v in own.items()}}
    no_counters = {k: v for k, v in bare.items() if not k.endswith("num_batches_tracked")}
    for sd in ({"module." + k: v for k, v in own.items()}, bare, {"state_dict": bare},
               {"model": {"module." + k: v for k, v in bare.items()}}, syncnet, no_counters):
        dst = AudioEncoder().load_reference_state_dict(sd).eval()
        with torch.no_grad():
            assert torch.equal(dst(mel), want)
    # Our own SyncNet's checkpoint: the tower one level deeper, beside a face tower.
    net = SyncNet(TINY_SYNC, emb_dim=16)
    randomise_bn(net.audio_encoder)
    dst = AudioEncoder().load_reference_state_dict({"model": net.state_dict()}).eval()
    with torch.no_grad():
        assert torch.equal(dst(mel), net.audio_encoder(mel))


def test_audio_encoder_rejects_mismatched_state_dicts():
    bare = {k[len("audio_encoder."):]: v for k, v in AudioEncoder().state_dict().items()}
    with pytest.raises(ValueError, match="1 missing"):
        AudioEncoder().load_reference_state_dict({k: v for k, v in bare.items() if k != "5.conv_block.0.bias"})
    with pytest.raises(ValueError, match="1 wrongly shaped"):
        AudioEncoder().load_reference_state_dict({**bare, "12.conv_block.0.bias": torch.zeros(7)})
    with pytest.raises(ValueError, match="audio towers"):
        AudioEncoder().load_reference_state_dict(UNet328(WIDTHS["light"]).state_dict())


def test_strided_depthwise_convs_compute_in_fp32_under_cpu_autocast():
    """The strided blocks' depthwise convs leave bf16 on a CPU (oneDNN's strided depthwise bf16
    kernels are the slow ones) and nothing else changes: same class family, same keys, plain
    convs at stride 1, the fp32 figure under autocast."""
    model = UNet328(WIDTHS["narrow"], stem="s2d")
    strided = [m for m in model.modules() if isinstance(m, StridedDepthwise)]
    assert len(strided) == 4 and all(m.stride == (2, 2) and m.groups == m.in_channels for m in strided)
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
               and not isinstance(m, StridedDepthwise))
    plain = UNet328(WIDTHS["narrow"], stem="s2d")
    assert list(plain.state_dict()) == list(model.state_dict())
    conv = strided[0]
    x = torch.randn(2, conv.in_channels, 40, 40).to(torch.bfloat16)
    with torch.no_grad():
        want = F.conv2d(x.float(), conv.weight, stride=2, padding=1, groups=conv.groups)   # fp32 on the same input
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = conv(x)
            bf16 = F.conv2d(x, conv.weight.to(torch.bfloat16), stride=2, padding=1, groups=conv.groups)
    assert got.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert (got - want).abs().max() < 1e-5 < (bf16.float() - want).abs().max()
    x = x.float()
    assert conv(x).dtype == torch.float32 and torch.equal(conv(x), F.conv2d(x, conv.weight, None, 2, 1, 1, conv.groups))


# ---- BatchNorm folding -----------------------------------------------------------------------
@pytest.mark.parametrize("make, inputs", [
    (lambda: UNet328(WIDTHS["light"]), lambda: unet_inputs(1)),
    (AudioEncoder, lambda: (torch.randn(4, 1, 80, 16),)),
])
def test_fold_bn_matches_eval_mode(make, inputs):
    model = randomise_bn(make())
    x = inputs()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        want = model(*x)
        assert (folded(*x) - want).abs().max() < 1e-4
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())   # original untouched


# ---- SyncNet ---------------------------------------------------------------------------------
def test_syncnet_shapes_and_unit_embeddings():
    net = SyncNet(SYNC_WIDTHS["light"], emb_dim=64).eval()
    with torch.no_grad():
        a, v = net(torch.rand(2, 3 * net.T, 320, 320), torch.randn(2, len(net.audio_offsets), 1, 80, 16))
        logits = net.logits(a, v)
    assert a.shape == v.shape == (2, 64)
    assert torch.allclose(a.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(v.norm(dim=1), torch.ones(2), atol=1e-5)
    assert logits.shape == (2,)
    assert torch.allclose(sync_logits(a, a, 5.0), torch.full((2,), 5.0), atol=1e-5)
    with pytest.raises(ValueError, match="SyncNet face"):
        net(torch.rand(2, 3, 320, 320), torch.randn(2, len(net.audio_offsets), 1, 80, 16))
    assert isinstance(net.audio_encoder, AudioEncoder)


def test_syncnet_full_half_frame_option():
    net = SyncNet(TINY_SYNC, emb_dim=16, T=1, lower_half=False, audio_k=1).eval()
    with torch.no_grad():
        a, v = net(torch.rand(2, 3, 320, 320), torch.randn(2, 1, 80, 16))
    assert v.shape == (2, 16)


def synthetic_sync_batch(n, T):
    """n positives and n shuffled negatives: a per-frame loudness pattern drives both the mel
    energy over time and the brightness of the lower half of each face frame."""
    pattern = torch.rand(n, T)                                          # (n, T)
    frame_of_col = torch.arange(16) * T // 16                           # mel column -> frame
    mel = (pattern[:, frame_of_col] * 8 - 4)[:, None, None, :].expand(n, 1, 80, 16)
    face = torch.full((n, T, 3, 320, 320), 0.5)
    face[..., 160:, :] = pattern[:, :, None, None, None]
    face = face.reshape(n, 3 * T, 320, 320)
    neg = torch.roll(torch.arange(n), 1)                                # each face with another's audio
    return torch.cat([face, face[neg]]), torch.cat([mel, mel]), torch.cat([torch.ones(n), torch.zeros(n)])


def test_syncnet_learns_a_tiny_sync_task():
    # 4 + 4 pairs seen at a 40x80 downscale keep the steps cheap; the task still needs both towers.
    face, mel, label = synthetic_sync_batch(4, T=5)
    net = SyncNet(TINY_SYNC, emb_dim=32, T=5, face_size=(40, 80), audio_k=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        a, v = net(face, mel)
        loss = F.binary_cross_entropy_with_logits(net.logits(a, v), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses
