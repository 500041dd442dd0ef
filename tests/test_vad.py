"""The silence gate's voice-activity detector (vad.py): a voice over a music-and-noise bed at
10-20 dB SNR keeps the mouth closed in the pauses, where loudness alone holds it open."""
import numpy as np
import pytest

import media_io
import utils
import vad
from compose import RenderOptions
from conftest import media

SR = utils.SR


def music_bed(n, seed=0):
    """A chord with a slow swell plus low-passed noise: loud where the voice pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    chord = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in (220, 277, 330, 440, 554))
    chord *= 0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t)
    noise = np.cumsum(rng.normal(0, 1, n))
    noise -= np.convolve(noise, np.ones(400) / 400, "same")
    x = chord / chord.std() + 0.5 * noise / noise.std()
    return (x / x.std()).astype(np.float32)


@pytest.fixture(scope="module")
def voice_with_pauses():
    """3 s of real speech, 1.6 s pause, x3 -> (wav, pause-interior frames, speech frames)."""
    sp = media_io.load_audio(media("speech_en_ad_10s.wav"))
    pause = np.zeros(int(1.6 * SR), np.float32)
    parts, flags = [pause], [np.ones(len(pause), bool)]
    for a in (0.0, 3.5, 6.5):
        parts += [sp[int(a * SR):int((a + 3) * SR)], pause]
        flags += [np.zeros(int(3 * SR), bool), np.ones(len(pause), bool)]
    wav, is_pause = np.concatenate(parts), np.concatenate(flags)
    n = media_io.num_frames(len(wav))
    hop = SR // utils.FPS
    pause_frames = np.array([is_pause[i * hop:(i + 1) * hop].all() for i in range(n)])
    interior = pause_frames.copy()                    # 3 frames away from any speech
    for d in range(1, 4):
        interior[d:] &= pause_frames[:-d]
        interior[:-d] &= pause_frames[d:]
    return wav, interior, ~pause_frames


def gate(wav, with_vad):
    n = media_io.num_frames(len(wav))
    return vad.ramp(vad.gate_loudness_db(wav, n, with_vad), RenderOptions.silence_db, RenderOptions.speech_db)   # inference's defaults


@pytest.mark.parametrize("snr_db", [20, 15, 10])
def test_a_sound_bed_does_not_hold_the_mouth_open_in_pauses(voice_with_pauses, snr_db):
    wav, pauses, speech = voice_with_pauses
    rms = np.sqrt(np.mean(wav[np.repeat(speech, SR // utils.FPS)[:len(wav)]] ** 2))
    mixed = wav + music_bed(len(wav)) * rms / 10 ** (snr_db / 20)
    loud, voiced = gate(mixed, False), gate(mixed, True)
    assert (loud[pauses] < 0.5).mean() <= 0.5                        # the fault: loudness hears the bed
    assert (voiced[pauses] < 0.5).mean() >= 0.9                      # closed in the pauses
    assert (voiced[speech] >= 0.5).mean() >= 0.8                     # and still open while he speaks
    clean = gate(wav, True)
    assert (clean[pauses] < 0.5).mean() >= 0.95 and (clean[speech] >= 0.5).mean() >= 0.8


def test_the_detector_hears_no_voice_in_silence_or_noise():
    rng = np.random.default_rng(0)
    quiet = np.zeros(2 * SR, np.float32)
    hum = (0.1 * np.sin(2 * np.pi * 100 * np.arange(2 * SR) / SR) + 0.01 * rng.normal(size=2 * SR)).astype(np.float32)
    for wav in (quiet, hum):
        p = vad.frame_speech_prob(wav, 50)
        assert p.shape == (50,) and p.max() < vad.PROB_PAUSE
    assert vad.chunk_probs(np.zeros(0, np.float32)).shape == (0,)


def test_vad_modes(monkeypatch):
    assert vad.use_vad("off") is False and vad.use_vad("auto") is True and vad.use_vad("on") is True
    with pytest.raises(utils.UserError, match="--vad 'maybe': choose auto, on, off"):
        vad.use_vad("maybe")
    monkeypatch.setattr(vad, "model_path", lambda: None)           # the package missing
    assert vad.use_vad("auto") is False
    with pytest.raises(utils.UserError, match="needs the silero-vad package"):
        vad.use_vad("on")


def test_band_push_scales_the_guidance_by_the_high_band_energy():
    """vad.band_push: frames whose 1-5 kHz energy is high (an open vowel's) get more push than loud
    frames with little of it (closed lips: a hum), the factors centre on 1 over the speech and stay
    within 1 +- 2W; no weight, or too little speech, leaves every frame at 1."""
    n, hop = 50, SR // utils.FPS
    t = np.arange(n * hop) / SR
    low = 0.5 * np.sin(2 * np.pi * 150 * t)                               # voiced, lips shut: the louder frames
    high = 0.3 * np.sin(2 * np.pi * 150 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t)   # plus energy at 2.5 kHz
    frame = np.arange(n * hop) // hop
    wav = np.where((frame // 5) % 2 == 1, high, low).astype(np.float32)   # 5 frames of each, in turn
    level = vad.gate_loudness_db(wav, n)
    push = vad.band_push(wav, n, 0.3, level, RenderOptions.speech_db)
    hi = (np.arange(n) // 5) % 2 == 1
    inner = (np.arange(n) % 5 > 0) & (np.arange(n) % 5 < 4)               # away from the switches
    assert push.shape == (n,) and push.dtype == np.float32
    assert push[hi & inner].min() > 1.2 and push[~hi & inner].max() < 0.8
    assert abs(push.mean() - 1) < 0.05 and push.min() >= 0.4 - 1e-6 and push.max() <= 1.6 + 1e-6
    assert (vad.band_push(wav, n, 0.0, level, RenderOptions.speech_db) == 1).all()
    assert np.array_equal(vad.frame_band_db(wav, n, chunk=7), vad.frame_band_db(wav, n))   # chunked: the same
    quiet = np.zeros(n * hop, np.float32)
    assert (vad.band_push(quiet, n, 0.3, vad.gate_loudness_db(quiet, n), RenderOptions.speech_db) == 1).all()


def buzz(f0, formants, seconds=6.0, seed=0):
    """A synthetic voiced sound: a pulse train at f0 (with jitter) through resonances at `formants` Hz,
    swelling and fading like syllables."""
    from scipy.signal import lfilter
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    x = np.zeros(n)
    t = 0.0
    while t < n:
        x[int(t)] = 1.0
        t += SR / (f0 * (1 + 0.03 * rng.normal()))
    for f in formants:
        r, w = 0.97, 2 * np.pi * f / SR
        x = lfilter([1 - r], [1, -2 * r * np.cos(w), r * r], x)
    x *= 0.2 + np.abs(np.sin(2 * np.pi * 2.5 * np.arange(n) / SR))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def test_auto_band_push_tells_another_voice_from_the_recorded_one(tmp_path):
    """--band_push -1 (auto): 0 for the avatar's own voice (another stretch of it, quieter), TEXT_BAND_PUSH for a
    voice of other pitch and formants, 0 when the avatar's recording is not at hand; a given W stays W."""
    own = buzz(110, (600, 1100, 2500))
    ds = tmp_path / "anna"
    ds.mkdir()
    media_io.write_wav(ds / utils.AUDIO_WAV, own)
    same = 0.5 * buzz(110, (600, 1100, 2500), seed=1)
    other = buzz(230, (900, 1800, 3200), seed=2)
    w, d_same = vad.auto_band_push(-1, same, "anna", (None, tmp_path), other=0.1)
    assert w == 0.0 and d_same < vad.OTHER_VOICE
    w, d_other = vad.auto_band_push(-1, other, "anna", (tmp_path,), other=0.1)
    assert w == 0.1 and d_other > vad.OTHER_VOICE > d_same
    assert vad.auto_band_push(-1, other, "bob", (tmp_path,), other=0.1) == (0.0, None)      # no recording: off
    assert vad.auto_band_push(0.2, other, "anna", (tmp_path,), other=0.1) == (0.2, None)
    assert RenderOptions().band_push == -1


def test_auto_band_push_on_real_voices():
    """The grid man's held-out minute is his own voice; andrew's lecture and a radio voice are not."""
    train = vad.voice_signature(media_io.load_audio(media("grid_s1_5min.mp4")))
    d = {k: vad.voice_distance(vad.voice_signature(media_io.load_audio(media(k))), train)
         for k in ("grid_s1_heldout_1min.mp4", "andrew_clip2_27s.mp4", "speech_en_radio_8s.wav")}
    assert d["grid_s1_heldout_1min.mp4"] < vad.OTHER_VOICE < min(d["andrew_clip2_27s.mp4"], d["speech_en_radio_8s.wav"]), d
