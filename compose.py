"""One output frame around the generator, shared by inference_328.LipSyncModel and evaluate's
baselines: the options of the render path (RenderOptions: each default written once here; the
Configs of inference_328.py and evaluate.py read theirs from it), the reference crop beside each
masked crop (References), the guided U-Net output (guide), and the paste (compose): silence gate, colour match, feathered blend.

    python -c "import compose; print(compose.RenderOptions())"
"""
from dataclasses import dataclass, fields

import cv2
import numpy as np

import geometry
import media_io
import phones
import utils
import vad
from templates import closed_score, open_score
from utils import BORDER, FEAT_WIN, INNER, UserError

REFERENCES = ("closed", "open", "random", "audio")
GUIDANCE = 1.25      # RenderOptions.guidance's default: files, evaluation, the server's videos (RESULTS.md round 8)
LIVE_GUIDANCE = 1.0  # a live stream's (stream.py): one U-Net pass a frame keeps light widths in real time
CLOSURES = 1.0       # the closures (RenderOptions) for a voice not the person's own: five filmed speakers followed at r 0.482 / 0.487 against 0.446 / 0.449 (two budget-A seeds, RESULTS.md round 57); on the man's own voice they cost (LMD 2.525 against 2.493 px)
TEXT_BAND_PUSH = 0.1 # the band_push for a voice not the person's own (the server's offline voice; auto's choice for another voice): five other speakers followed at r 0.45 against 0.40 (RESULTS.md round 54)
SHARPEN = 0.5        # RenderOptions.sharpen's default: mouth sharpness 0.71-0.85 -> 0.86-0.99 of the truth's for 0.13-0.20 dB of mouth PSNR (RESULTS.md round 39)
SHARPEN_SIGMA = 1.0  # px of the frame (at least one of the crop): the blur the unsharp mask (sharpen) takes away
BANK_HOLD = 0.02     # --reference audio: the bank frame in use is kept until another sounds this much nearer (cosine)


@dataclass(frozen=True)
class RenderOptions:
    """How LipSyncModel.frames/render and the baselines make frames: each default written once,
    here. Scripts build it from their Config with from_config."""
    start_frame: int = 0           # first template frame (the template then plays forward, backward, ...)
    feather: int = 16              # px (in the 328 crop) over which the pasted face fades into the frame
    color_match: bool = True       # match the generated crop's colours to the template near the seam
    reference: str = "closed"      # reference crop: closed (the most closed mouth), open (a wide-open one: teeth in view), random (training's rule) or audio (the checkpoint's bank frame that sounds most alike: models trained with --reference audio)
    silence_gate: bool = True      # where the audio is silent, blend the mouth toward the closed reference
    silence_db: float = -45.0      # gate level (dB, loud frames at -12) at or below which a frame is silent
    speech_db: float = -35.0       # gate level (dB, same scale) at or above which the generated mouth is used as is
    vad: str = "auto"              # the gate asks the voice-activity detector: auto (when installed), on, off
    seed: int = 0                  # seed of the random reference choice
    guidance: float = GUIDANCE     # the painted mouth moves this many times as far from what the same frame paints with silence (guide): 1 = the network's own output
    band_push: float = -1.0        # [-1..1] each frame's guidance times 1 + W x its 1-5 kHz energy's z-score over the clip's speech (vad.band_push): follows voices other than the person's better, costs LMD on the person's own (RESULTS.md round 54); 0 = one guidance for every frame; -1 = auto: TEXT_BAND_PUSH when the voice is not the avatar's recorded one, else 0 (vad.auto_band_push, round 56)
    closures: float = -1.0         # [-1..1] on the frames where the audio's lips shut (a p, b or m; half for f, v, w, u; 1 + W / 4 for open vowels: phones.lip_closures) the guidance times 1 - W: at 1 the mouth is painted shut there; -1 = auto: CLOSURES when the band push (resolved) is on, i.e. for a voice that is not the person's own (RESULTS.md round 57), else 0
    crf: int = 18                  # H.264 quality of a rendered mp4 (lower = better, larger)
    sharpen: float = SHARPEN       # unsharp-mask amount on the painted mouth (sharpen): 0 = the network's own output

    @classmethod
    def from_config(cls, cfg, default=None):
        """The options a script's Config sets (its fields of the same names); the rest keep their
        defaults. A guidance < 0 means the default of the path: `default` (LipSyncModel.guidance_for:
        the model's fitted guidance, a photo's, or a live stream's) or, without one, GUIDANCE."""
        kw = {f.name: getattr(cfg, f.name) for f in fields(cls) if hasattr(cfg, f.name)}
        if kw.get("guidance", 0) < 0:
            kw["guidance"] = GUIDANCE if default is None else default
        return cls(**kw)


def frame_guidance(opts, wav, n, loud, name, data_roots, stats):
    """Each of n frames' guidance: opts.guidance, times the band push (auto: TEXT_BAND_PUSH for a voice
    that is not avatar `name`'s recorded one, vad.auto_band_push) and the closures (auto: CLOSURES with
    the band push on). `loud`: the gate's level per frame. -> [n] float32; stats gets band_push,
    voice_distance, closures and closures_found (how many p, b, m, f, v, w, u and open vowels were found; None without the recogniser)."""
    w, stats["voice_distance"] = vad.auto_band_push(opts.band_push, wav, name, data_roots, TEXT_BAND_PUSH)
    c = opts.closures if opts.closures >= 0 else (CLOSURES if w > 0 else 0.0)
    shut, stats["closures_found"] = phones.lip_closures(wav, n, c)
    stats["band_push"], stats["closures"] = w, c
    return opts.guidance * vad.band_push(wav, n, w, loud, opts.speech_db) * shut


# ----------------------------------------------------------------------------------------------
# The reference crop beside each masked crop
class References:
    """The reference crop fed beside each masked crop. `closed`: one fixed template frame with the
    most closed mouth (among frames of typical crop size, so not an odd pose); `random`: a random
    frame more than utils.REF_GAP frames from the target, drawn anew for each output frame (training's rule);
    `audio`: the frame of the generator's bank (crops, keys: train_328 --reference audio) whose sound is
    nearest the output frame's (by_audio), its colours matched to the template's closed crop."""

    def __init__(self, template, mode="closed", seed=0, bank=None):
        if mode not in REFERENCES:
            raise UserError(f"--reference {mode!r}: choose {', '.join(REFERENCES)}")
        if mode == "audio" and bank is None:
            raise UserError("--reference audio needs a generator trained with it (python train_328.py --reference audio); "
                            "this checkpoint holds no reference bank: use --reference closed")
        self.template, self.mode = template, mode
        self.rng = np.random.default_rng(seed)
        self.closed_index = int(np.argmin(closed_score(template.lms, template.boxes)))
        self.closed = np.ascontiguousarray(geometry.inner(template.crop(self.closed_index)))   # (320, 320, 3): the silence gate's mouth
        self.fixed_index = int(np.argmin(open_score(template.lms, template.boxes))) if mode == "open" else self.closed_index
        self.fixed = self.closed if mode != "open" else np.ascontiguousarray(geometry.inner(template.crop(self.fixed_index)))
        self.mouth = geometry.mouth_region(geometry.to_crop_coords(template.lms, template.boxes))
        if mode == "audio":
            crops, self.bank_keys = np.asarray(bank[0]), np.asarray(bank[1], np.float32)
            self.bank = _match_colours(crops, self.closed)
            self.current = None

    def by_audio(self, windows):
        """Bank crops (320, 320, 3) for consecutive output frames' audio windows (B, 32, 16, 16): the
        one that sounds most alike, kept while no other is BANK_HOLD nearer (fewer switches: less flicker)."""
        out = []
        for sim in media_io.audio_key(windows) @ self.bank_keys.T:
            best = int(np.argmax(sim))
            if self.current is None or sim[best] > sim[self.current] + BANK_HOLD:
                self.current = best
            out.append(self.bank[self.current])
        return out

    def index(self, k, j):
        """Template frame of the reference for output frame k shown on template frame j."""
        n = self.template.n
        g = utils.REF_GAP
        if self.mode != "random" or n <= 2 * g + 1:
            return self.fixed_index
        r = int(self.rng.integers(0, n - 2 * g - 1))
        return min(r if r < j - g else r + 2 * g + 1, n - 1)                      # skip j-g .. j+g

    def crop(self, k, j):
        """Reference 320 crop for output frame k shown on template frame j."""
        r = self.index(k, j)
        return self.fixed if r == self.fixed_index else np.ascontiguousarray(geometry.inner(self.template.crop(r)))


def guide(run, img, audio, silent, guidance=GUIDANCE, stills=None):
    """The U-Net's output moved `guidance` times as far from what the same frame paints with
    silence (as classifier-free guidance does): run(img, audio) -> (B, 3, 320, 320) float, audio
    windows (B, 32, 16, 16), silent: the window of silence (32, 16, 16). A window's frames outside
    the audio (all-zero vectors) stay zero in its silent twin, so silence is left as painted.
    The L1-trained mouth is the average of the shapes its audio allows; > 1 undoes some of that
    shrinking at the cost of a second U-Net pass, which `stills` (a StillCache) saves where the
    input repeats (a photo). `guidance`: a number, or one per frame of the batch."""
    out = run(img, audio)
    g = np.asarray(guidance, np.float32).reshape(-1, 1, 1, 1)    # one guidance, or one per frame (band_push)
    if (g == 1.0).all():
        return out
    frames = audio.reshape(len(audio), FEAT_WIN, -1)
    quiet = np.where((frames != 0).any(-1, keepdims=True), silent.reshape(1, FEAT_WIN, -1), np.float32(0))
    quiet = np.ascontiguousarray(quiet.reshape(audio.shape), np.float32)
    still = run(img, quiet) if stills is None else stills.run(run, img, quiet)
    return still + g * (out - still)


class StillCache:
    """The silent passes of guide() kept for the inputs they were made from. A photo's crop and reference
    repeat frame after frame and so does the window of silence (but near the audio's ends), so with one
    its guidance costs one U-Net pass a frame, not two, and a live stream can afford it."""

    def __init__(self, size=4):
        self.size, self.items = size, []        # (input image, silent window, output), newest last

    def run(self, run, img, quiet):
        out = [next((o for x, q, o in self.items if np.array_equal(q, quiet[i]) and np.array_equal(x, img[i])), None)
               for i in range(len(img))]
        miss = [i for i, o in enumerate(out) if o is None]
        if miss:
            for i, o in zip(miss, run(np.ascontiguousarray(img[miss]), np.ascontiguousarray(quiet[miss]))):
                out[i] = o
                self.items = (self.items + [(img[i].copy(), quiet[i].copy(), o)])[-self.size:]
        return np.stack(out)


def sharpen(img, amount, sigma=SHARPEN_SIGMA):
    """Unsharp mask of a uint8 image: img + amount x (img - its Gaussian blur of `sigma` px),
    saturated to 0..255 (compose passes one pixel of the frame, in the crop's pixels). The
    L1-trained mouth holds less fine detail than the person's (evaluate.py's mouth sharpness);
    this restores the edges it did paint, not detail it did not."""
    if amount <= 0:
        return img
    return cv2.addWeighted(img, 1.0 + amount, cv2.GaussianBlur(img, (0, 0), sigma), -amount, 0)


def _match_colours(crops, like):
    """Crops (P, 320, 320, 3) uint8 with each channel's mean and spread over all of them moved to
    those of `like` (320, 320, 3): a bank from the training video beside another recording's frames."""
    x = crops.astype(np.float32)
    mu, sd = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2)) + 1e-3
    t = like.astype(np.float32)
    gain = np.clip(t.std(axis=(0, 1)) / sd, 0.5, 2.0)
    return np.clip((x - mu) * gain + t.mean(axis=(0, 1)) + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Paste: generated centre -> crop -> silence gate -> colour match -> feathered blend
_SEAM_MASK = {}


def seam_mask(feather, mask=None):
    """Where colour statistics are compared: the band of the paste alpha near its edge (where a
    seam would show), or the whole pasted area when there is no feather."""
    key = (feather, geometry.mask_key(mask))
    if key not in _SEAM_MASK:
        a = geometry.paste_alpha(feather, mask)
        band = (a > 0.02) & (a < 0.98)
        _SEAM_MASK[key] = (band if band.sum() > 1000 else a > 0.5).astype(np.float32)
    return _SEAM_MASK[key]


def compose(item, opts=RenderOptions(), mask=None):
    """One output frame from (frame, box, crop328, generated320, closed_ref320, gate level dB
    [, mouth region]) as LipSyncModel._generate yields them; without a mouth region,
    geometry.DEFAULT_MOUTH. Only the generator's masked area (`mask`, None = MASK_RECT) is pasted."""
    frame, box, crop, gen, closed, db, *region = item
    out = crop.copy()                                             # the 4 px ring stays original
    gen = sharpen(gen, opts.sharpen, SHARPEN_SIGMA * max(1.0, utils.CROP / max(box[2] - box[0], 1)))
    if opts.silence_gate:
        w = float(vad.ramp(db, opts.silence_db, opts.speech_db))
        if w < 1.0:                      # silence: the mouth rests as in the closed reference
            a = geometry.mouth_alpha(*region)[..., 0] * np.float32(1.0 - w)
            gen = cv2.blendLinear(np.ascontiguousarray(closed), np.ascontiguousarray(gen), a, 1.0 - a)
    out[BORDER:BORDER + INNER, BORDER:BORDER + INNER] = gen
    y0, y1, x0, x1 = geometry.paste_support(opts.feather, mask)
    if opts.color_match and y1 > y0 and x1 > x0:   # only where the paste takes the crop's pixels (the same statistics)
        out[y0:y1, x0:x1] = geometry.match_color(out[y0:y1, x0:x1], crop[y0:y1, x0:x1],
                                                 seam_mask(opts.feather, mask)[y0:y1, x0:x1])
    return geometry.paste_back(frame, box, out, opts.feather, mask)
