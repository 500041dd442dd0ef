"""A synthetic talking clip from one real still face, for the demo and the tests (and a fake
processed dataset folder, write_fake_dataset, for tests and benchmarks).

    python synthetic.py out.mp4                       # astronaut face + synthetic speech, 8 s
    python synthetic.py out.mp4 --wav speech.wav      # the same face driven by real speech

The actor is synthetic: a still photo whose jaw is warped open in proportion to the loudness of
the audio, with a dark mouth interior drawn between the lips and a slow, small head drift. It is
honest test material (lips follow the audio at lag 0 by construction), not a real recording.
The default face is scikit-image's astronaut photo (public domain, ships with the package).
"""
import json
import sys
from pathlib import Path

import cv2
import numpy as np

import media_io
import utils
from utils import FPS, SR


def default_face(size=384):
    """The astronaut photo cropped around her face and resized to size x size (BGR)."""
    from skimage import data
    img = data.astronaut()[:, :, ::-1]                         # RGB -> BGR
    # face box measured with dlib on the 512 photo: about x 179..266, y 83..170
    cx, cy, side = 222, 140, 250
    crop = img[max(cy - side // 2, 0):cy + side // 2, max(cx - side // 2, 0):cx + side // 2]
    return cv2.resize(np.ascontiguousarray(crop), (size, size), interpolation=cv2.INTER_CUBIC)


def synth_speech(seconds=8.0, seed=0, lead_silence=0.6):
    """Speech-like audio: voiced syllables (harmonic buzz through moving formants) of random
    length and loudness, separated by short pauses, with silence at both ends. float32 [S]."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    env = np.zeros(n, np.float32)
    t = lead_silence
    while t < seconds - lead_silence - 0.15:
        dur = rng.uniform(0.12, 0.3)
        a, b = int(t * SR), int(min(t + dur, seconds - lead_silence) * SR)
        env[a:b] = rng.uniform(0.4, 1.0) * np.sin(np.linspace(0, np.pi, b - a)) ** 0.7
        t += dur + (rng.uniform(0.05, 0.15) if rng.random() < 0.8 else rng.uniform(0.35, 0.6))
    tt = np.arange(n) / SR
    f0 = 120 + 15 * np.sin(2 * np.pi * 0.7 * tt)               # gentle intonation, Hz
    phase = 2 * np.pi * np.cumsum(f0) / SR
    buzz = sum(np.sin(k * phase) / k for k in range(1, 30))    # sawtooth-like voice source
    # two formant resonances that drift, so the spectrum (not only loudness) moves
    f1 = 500 + 250 * np.sin(2 * np.pi * 2.1 * tt + rng.uniform(0, 6))
    weight = sum(np.exp(-((k * f0 - f1) / 150) ** 2) + 0.5 * np.exp(-((k * f0 - 1500) / 300) ** 2)
                 * np.sin(k * phase) / k for k in range(1, 30))
    voice = 0.5 * buzz / 3 + weight
    wav = env * voice / (np.abs(voice).max() + 1e-6) * 0.6
    wav += rng.normal(0, 1e-3, n)                               # room noise, so silence is not digital zero
    return wav.astype(np.float32)


def opening_track(wav, n_frames):
    """Mouth opening in [0, 1] per video frame from the audio loudness (RMS in each frame)."""
    hop = SR // FPS
    rms = np.array([np.sqrt(np.mean(wav[i * hop:(i + 1) * hop] ** 2) + 1e-12) for i in range(n_frames)])
    db = 20 * np.log10(rms + 1e-9)
    top = np.percentile(db, 95)
    op = np.clip((db - (top - 30)) / 30, 0, 1) ** 1.5            # 30 dB range below the loud peaks
    return np.convolve(op, [0.25, 0.5, 0.25], mode="same")    # lips move smoothly


def jaw_area(lm, shape, below):
    """Soft (0..1) map of the photo's lower face, float32 of `shape`: inside its jaw outline
    (utils.JAW_OUTLINE) and up to `below` px under it, feathered over ~2 px. The jaw warp stays in
    here: beside the jaw (the cheeks' edges, the collar) it moved the picture outside the area the
    generator repaints, and the demo's model read the opening from there, not from the audio."""
    area = np.zeros(shape, np.uint8)
    cv2.fillPoly(area, [np.round(lm[utils.JAW_OUTLINE]).astype(np.int32)], 1)
    k = np.zeros((2 * int(below) + 1, 1), np.uint8)
    k[:int(below) + 1] = 1                                       # grows downwards only
    area = cv2.erode(cv2.dilate(area, k), np.ones((7, 7), np.uint8))   # 3 px in from the outline
    return cv2.GaussianBlur(area.astype(np.float32), (0, 0), 1.0)


def render_frame(face, lm, opening, drift=(0.0, 0.0)):
    """Open the jaw of `face` by `opening` (0..1) and translate it by `drift` px."""
    h, w = face.shape[:2]
    mouth = lm[48:68]
    mx, my = mouth[:, 0].mean(), mouth[:, 1].mean()
    mw = mouth[:, 0].max() - mouth[:, 0].min()
    chin = lm[8, 1]
    drop = 0.45 * mw * opening                                 # px the lower lip moves down
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    wx = np.exp(-((xs - mx) / (0.9 * mw)) ** 2)
    # 0 above the lip line, 1 from the lower lip to the chin, gone 0.1 mouth widths below the chin:
    # the neck stays still, so nothing outside the area the generator repaints (the jaw mask, grown
    # beyond the widest-open chin) shows how far the jaw is open; the model must take it from the
    # audio (with a 0.6 fade the demo's mouth followed its frames' jaws, not the audio: README)
    wy = np.clip((ys - my) / (0.15 * mw), 0, 1) * np.clip(1 - (ys - chin) / (0.1 * mw), 0, 1)
    dy = drop * wx * wy * jaw_area(lm, (h, w), 0.1 * mw)
    out = cv2.remap(face, (xs - drift[0]).astype(np.float32), (ys - dy - drift[1]).astype(np.float32), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if drop > 1:
        # dark mouth interior between the inner lips, as wide as the inner lip line
        inner = lm[60:68]
        iw = (inner[:, 0].max() - inner[:, 0].min()) * 0.45
        cv2.ellipse(out, (int(mx + drift[0]), int(my + drop * 0.5 + drift[1])), (int(iw), int(drop * 0.5)),
                    0, 0, 360, (30, 20, 60), -1, cv2.LINE_AA)
    return out


def make_talking_clip(out_path, wav=None, face=None, seconds=8.0, seed=0, drift_px=3.0):
    """Write an mp4 (H.264 25 fps + AAC) of `face` (BGR, default the astronaut) saying `wav`
    (float32 16 kHz; default synth_speech). Returns the path."""
    import landmarks
    face = default_face() if face is None else face
    wav = synth_speech(seconds, seed) if wav is None else np.asarray(wav, np.float32)
    faces = landmarks.make_detector("dlib").detect(face)
    if not faces:
        raise utils.UserError("no face found in the image given to the synthetic actor")
    lm = faces[0][0]
    n = media_io.num_frames(len(wav))
    op = opening_track(wav, n)
    out_path = Path(out_path)
    wav_path = out_path.with_suffix(".tmp.wav")
    media_io.write_wav(wav_path, wav)
    try:
        h, w = face.shape[:2]
        with media_io.VideoWriter(out_path, w, h, audio=wav_path, crf=16) as vw:
            for k in range(n):
                t = k / FPS
                drift = (drift_px * np.sin(2 * np.pi * 0.13 * t), 0.5 * drift_px * np.sin(2 * np.pi * 0.07 * t))
                vw.write(render_frame(face, lm, op[k], drift))
    finally:
        wav_path.unlink(missing_ok=True)
    return out_path


# ----------------------------------------------------------------------------------------------
# A synthetic dataset folder for tests and benchmarks: a "mouth" whose opening follows a scalar
# that is also written into the audio features, so the task is learnable and audio matters.
def write_fake_dataset(ds_dir, n=40, seed=0):
    """Write a minimal processed dataset (crops.npy, mel.npy, aud_feat.npy/.json, meta.json,
    landmarks.npz, an audio-encoder checkpoint as the features' source) into ds_dir."""
    import torch

    from audio_features import encoder_id
    from unet_328 import AudioEncoder
    ds = Path(ds_dir)
    ds.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    openness = (0.5 + 0.5 * np.sin(np.arange(n) * 0.7)).astype(np.float32)       # (N,) in [0, 1]
    yy, xx = np.mgrid[0:utils.CROP, 0:utils.CROP].astype(np.float32)
    skin = np.stack([120 + 40 * yy / utils.CROP, 150 + 20 * xx / utils.CROP, 190 + 0 * xx], -1)
    crops = np.empty((n, utils.CROP, utils.CROP, 3), np.uint8)
    for i in range(n):
        img = skin + rng.normal(0, 4, skin.shape)
        mouth = ((xx - 164) / 60) ** 2 + ((yy - 240) / (4 + 30 * openness[i])) ** 2 < 1
        img[mouth] = (40, 30, 90)
        crops[i] = np.clip(img, 0, 255).astype(np.uint8)
    np.save(ds / utils.CROPS, crops)
    n_mel = n * utils.MEL_FPS // utils.FPS + 1
    np.save(ds / utils.MEL, rng.uniform(-4, 4, (utils.N_MELS, n_mel)).astype(np.float32))
    direction = rng.normal(0, 1, utils.FEAT_DIM).astype(np.float32)
    feats = openness[:, None] * direction[None] + rng.normal(0, 0.1, (n, utils.FEAT_DIM)).astype(np.float32)
    np.save(ds / utils.AUD_FEAT, feats.astype(np.float32))
    torch.manual_seed(seed)
    enc = AudioEncoder()
    utils.save_checkpoint({"model": enc.state_dict()}, ds / "fake_encoder.pth")
    (ds / utils.AUD_FEAT_INFO).write_text(json.dumps({"encoder_id": encoder_id(enc), "source": str(ds / "fake_encoder.pth"),
                                                  "frames": n, "fake": True}))
    boxes = np.tile(np.array([0, 0, utils.CROP, utils.CROP]), (n, 1))
    lms = np.zeros((n, 68, 2), np.float32)                   # the mouth on the drawn ellipse, a jaw line and nose bottom around it
    t = np.pi - np.pi * np.arange(17) / 16                    # contour 0..16: left cheek, chin, right cheek
    lms[:, :17, 0], lms[:, :17, 1] = 164 + 150 * np.cos(t), 200 + 100 * np.sin(t)
    lms[:, 31:36, 0], lms[:, 31:36, 1] = np.linspace(140, 188, 5), 175
    # outer lip 48..59 on the ellipse, inner lip 60..67 inside it (the 68-point order: left corner,
    # upper lip left to right, right corner, lower lip right to left), so mouth_opening follows it
    for idx, scale in ((np.arange(48, 60), 1.0), (np.arange(60, 68), 0.8)):
        ang = np.pi - 2 * np.pi * np.arange(len(idx)) / len(idx)
        lms[:, idx, 0] = 164 + scale * 60 * np.cos(ang)
        lms[:, idx, 1] = 240 - scale * (4 + 30 * openness[:, None]) * np.sin(ang)
    np.savez(ds / utils.LANDMARKS, lms=lms, crop_boxes=boxes, found=np.ones(n, bool))
    (ds / utils.META).write_text(json.dumps({"name": ds.name, "fps": utils.FPS, "frames": n, "fake": True,
                                              "width": utils.CROP, "height": utils.CROP}))
    return ds


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "synthetic.mp4"
    wav = media_io.load_audio(sys.argv[sys.argv.index("--wav") + 1]) if "--wav" in sys.argv else None
    print(utils.run_main(make_talking_clip, out, wav))
