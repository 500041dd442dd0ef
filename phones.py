"""The mouth shaped by the phones of the audio, for a voice that is not the person's own: shut where
it has a p, b or m, half shut for f, v, narrowed for w, u and a little wider for open vowels
(lip_closures: per-frame factors on the guidance; `--closures`, RESULTS.md rounds 57-59). The phones
come from the phoneme recogniser of the `hama` wheel (Apache-2.0, its model inside the wheel: nothing
is downloaded), ~75 ms per second of audio on 2 cores. Where the package is missing,
`phones_available()` is False and every factor is 1.
"""
import importlib.util
import threading

import numpy as np

from utils import FPS, SR

BILABIALS = ("p", "b", "m")   # the phones whose lips shut ...
LABIODENTALS = ("f", "v")      # ... and those whose lower lip meets the upper teeth: half shut
LABIODENTAL_SHARE = 0.5        # of the closures' weight they get (five filmed speakers: r +0.010 / +0.008 on two seeds, RESULTS.md round 57)
CLOSURE_LEAD = (3, 1)          # frames before a bilabial's recognised start (its release) that the lips are shut: five filmed speakers' own mouths were most closed 3-1 frames before it (RESULTS.md round 57)
ROUNDED = ("w", "u")           # rounded, the lips narrowed: their whole span ...
ROUNDED_SHARE = 0.5            # ... at this share of the weight (five filmed speakers: r +0.004 / +0.007 / +0.007 on three models, round 58)
OPEN_VOWELS = ("æ", "ɑ", "a", "aɪ", "aʊ")   # the jaw's widest: their span ...
OPEN_SHARE = 0.25              # ... 1 + W x this, where nothing shuts (nine filmed speakers: r +0.005 to +0.012 on three models, round 59)
SPAN_LEAD, SPAN_MAX = 2, 8     # frames a w, u or open vowel's span is moved earlier (the lips shape before the sound), its most frames
PHONE_CHUNK_S = 20             # seconds of audio per recogniser call ...
PHONE_OVERLAP_S = 1            # ... heard with this much more either side (recognised_phones)
_phones, _phones_lock = None, threading.Lock()   # one recogniser, loaded once, used by one render at a time


def phones_available():
    """Whether the phoneme recogniser (the `hama` wheel, Apache-2.0, its model inside) is installed."""
    return importlib.util.find_spec("hama") is not None


def lip_closures(wav, n, weight, lead=CLOSURE_LEAD):
    """--closures W: per-frame factors on the guidance, 1 - W on the frames where the lips shut for a
    p, b or m (`lead` frames before each one's start as hama's phoneme recogniser finds it in `wav`),
    1 - W x LABIODENTAL_SHARE for an f or v, 1 - W x ROUNDED_SHARE over a w or u and 1 + W x OPEN_SHARE
    over an open vowel where nothing shuts (each span SPAN_LEAD frames earlier), 1 elsewhere: at W 1
    the frames of a p, b, m are painted as the frame paints silence, lips shut. All ones when W is 0 or
    the recogniser is not installed. -> ([n] float32, number of those phones found: None without it)."""
    f, wide = np.ones(n, np.float32), np.zeros(n, bool)
    if weight <= 0 or not phones_available():
        return f, (0 if weight <= 0 else None)
    found = 0
    for start_s, end_s, phone in recognised_phones(wav):
        s = int(round(start_s * FPS))
        if phone in BILABIALS + LABIODENTALS:
            share, a, b = (1.0 if phone in BILABIALS else LABIODENTAL_SHARE), s - lead[0], s - lead[1] + 1
        elif phone in ROUNDED + OPEN_VOWELS:
            a = s - SPAN_LEAD
            share, b = ROUNDED_SHARE, min(a + SPAN_MAX, max(int(round(end_s * FPS)) - SPAN_LEAD, a + 1))
        else:
            continue
        found += 1
        if phone in OPEN_VOWELS:
            wide[max(0, a):max(0, min(n, b))] = True
            continue
        part = f[max(0, a):max(0, min(n, b))]
        np.minimum(part, 1 - np.float32(weight * share), out=part)
    f[wide & (f == 1)] = 1 + np.float32(weight * OPEN_SHARE)
    return f, found


def recognised_phones(wav):
    """hama's phones in 16 kHz `wav`, [(start, end in seconds, phone)], in order. Recognised PHONE_CHUNK_S at a
    time, each chunk heard with PHONE_OVERLAP_S of audio either side and keeping the phones that start
    inside it, so none is cut or counted twice at a seam; a progress bar (on a terminal) past one chunk."""
    global _phones
    from tqdm import tqdm
    step, pad, out = PHONE_CHUNK_S * SR, PHONE_OVERLAP_S * SR, []
    for k in tqdm(range(0, len(wav), step), desc="finding p/b/m/f/v/w/u and open vowels", unit="chunk", leave=False,
                  disable=None if len(wav) > step else True):
        lo = max(0, k - pad)
        part = np.asarray(wav[lo:k + step + pad], np.float32)
        if len(part) < SR // 10:                # too short to recognise (a last chunk keeps its 1 s before)
            break
        with _phones_lock:
            if _phones is None:
                from hama.asr import ASRModel
                _phones = ASRModel()
            spans = _phones.phoneme_spans(_phones.transcribe_waveform(part, SR))
        for span in spans:
            t = lo / SR + span.start_ms / 1000
            if k <= t * SR < k + step:
                out.append((t, lo / SR + span.end_ms / 1000, span.phoneme))
    return out
