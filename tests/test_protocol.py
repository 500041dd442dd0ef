"""protocol.py: the measurement protocol runs end to end (process -> SyncNet -> generator ->
evaluate.py beside the template baseline) and reuses what it made. Tiny budgets on the synthetic
clip; about a minute on 2 CPU cores."""
import json

import pytest

import protocol
from utils import UserError


def test_protocol_runs_end_to_end_and_reuses_its_data(synthetic_clip, tmp_path, capsys):
    cfg = protocol.Config(train_video=str(synthetic_clip), heldout_video=str(synthetic_clip), out_dir=str(tmp_path),
                          sync_steps=2, steps=2, widths="4,4,8,8,16,16", batch_size=2, eval_frames=40, threads=1,
                          num_workers=0, label="smoke")
    s = protocol.main(cfg)
    assert s["train_steps"] == 2 and s["samples_per_s"] > 0 and s["batch_size"] == 2
    for k in ("psnr_mouth", "opening_r", "opening_width_ratio", "ablation_gap", "sync_stretch_acc_gen"):
        assert k in s["metrics"] and k in s["baseline"]
    assert s["baseline"]["ablation_gap"] == 0.0                     # the baseline ignores audio
    assert s["metrics"]["band_push"] == 0.0 and s["baseline"]["band_push"] is None   # recorded; auto: 40 frames, too short to judge
    run = tmp_path / "checkpoint" / "talk" / "runs" / "smoke"
    assert json.loads((run / "summary.json").read_text())["metrics"] == s["metrics"]
    assert (run / "eval" / "strip.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "| opening_r |" in out and "template baseline" in out
    assert s["guidance"] == s["guidance_photo"] == 1.25 and "guidance 1.25 (photo 1.25);" in out   # a 6 s clip: too short a tail to fit
    sync_dir = tmp_path / "checkpoint" / "talk"                     # a 2-step SyncNet: the auto opening head stays off
    assert json.loads((sync_dir / "protocol_syncnet.json").read_text()) == {"steps": 2, "seed": 0}
    assert json.loads((sync_dir / "syncnet_config.json").read_text())["opening_weight"] == 0.0
    s2 = protocol.main(cfg)                                         # a second run reuses datasets, SyncNet, baseline
    assert "syncnet_s" not in s2["times"] and s2["baseline"] == s["baseline"]
    judge = tmp_path / "judge" / "syncnet_best.pth"                 # --judge: a fixed SyncNet scores model and baseline
    judge.parent.mkdir()
    judge.write_bytes((tmp_path / "checkpoint" / "talk" / "syncnet_best.pth").read_bytes())
    capsys.readouterr()
    import media_io
    import synthetic
    wav = tmp_path / "voice.wav"
    media_io.write_wav(wav, synthetic.synth_speech(2.0, seed=3, lead_silence=0.4))
    s3 = protocol.main(protocol.Config(**{**vars(cfg), "judge": str(judge.parent), "label": "judged",
                                          "voices": f"{synthetic_clip},{wav}"}))   # --voices: a filmed speaker, an audio file
    used = [json.loads(p.read_text())["syncnet"]["checkpoint"] for p in (
        tmp_path / "checkpoint" / "talk" / "runs" / "judged" / "eval" / "metrics.json",
        tmp_path / "checkpoint" / "talk" / "eval_baseline_template" / "metrics.json",
        tmp_path / "checkpoint" / "talk" / "runs" / "judged" / "voices" / synthetic_clip.stem / "metrics.json")]
    assert used == [str(judge)] * 3                                 # the folder's SyncNet scores the other voices too
    v = s3["voices"][synthetic_clip.name]
    assert -1 <= v["env_r_gen"] <= 1 and 0 <= v["sync_stretch_acc_gen"] <= 1 and v["opening_sd_gen"] > 0
    assert -1 <= v["speaker_r"] <= v["speaker_r_at_lag"] <= 1 and abs(v["speaker_lag"]) <= 10   # a video: its own mouth is the truth
    assert s3["voices"]["voice.wav"]["speaker_r"] is None and s3["voices"]["voice.wav"]["opening_sd_gen"] >= 0
    out = capsys.readouterr().out
    assert f"| {synthetic_clip.name} |" in out and s["voices"] is None
    assert f"filmed voices: mean r vs their own opening {v['speaker_r']:.3f} over 1" in out   # the wav has no truth
    with pytest.raises(UserError, match="--voices .*not found"):   # checked before any training
        protocol.main(protocol.Config(**{**vars(cfg), "voices": str(tmp_path / "none.wav"), "label": "x"}))
    assert not (tmp_path / "checkpoint" / "talk" / "runs" / "x").exists()
    with pytest.raises(UserError, match="--judge .*no SyncNet checkpoint"):   # so is a judge that is not there
        protocol.main(protocol.Config(**{**vars(cfg), "judge": str(tmp_path), "label": "y"}))
    assert not (tmp_path / "checkpoint" / "talk" / "runs" / "y").exists()


def test_protocol_switches_audio_sources_without_retraining(synthetic_clip, tmp_path):
    """--audio_source speech trains its own SyncNet beside the mel one and rewrites the dataset's
    features; the mel SyncNet stays the judge; going back to mel rewrites the features only."""
    base = dict(train_video=str(synthetic_clip), heldout_video=str(synthetic_clip), out_dir=str(tmp_path), sync_steps=2,
                steps=1, widths="4,4,8,8,16,16", batch_size=2, eval_frames=40, threads=1, num_workers=0, baseline=False)
    ds = tmp_path / "dataset" / "talk"
    protocol.main(protocol.Config(**base, label="m"))
    s = protocol.main(protocol.Config(**base, label="s", audio_source="speech"))
    assert "syncnet_s" in s["times"] and (tmp_path / "checkpoint" / "speech" / "talk" / "syncnet_best.pth").is_file()
    assert json.loads((ds / "aud_feat.json").read_text())["features"] == "speech"
    assert (tmp_path / "checkpoint" / "speech" / "talk" / "runs" / "s" / "summary.json").is_file()
    m = protocol.main(protocol.Config(**base, min_lr_frac=0.5))   # no --label: one built from the settings, --widths' commas as '-'
    runs = tmp_path / "checkpoint" / "talk" / "runs"
    assert [p.name for p in runs.iterdir() if p.name != "m"] == ["4-4-8-8-16-16_b2_s1_under_nose_lr0.004_ema0.99_mlr0.5_s2d4l"]
    assert json.loads((runs / "4-4-8-8-16-16_b2_s1_under_nose_lr0.004_ema0.99_mlr0.5_s2d4l" / "config.json").read_text())["min_lr_frac"] == 0.5
    assert "syncnet_s" not in m["times"] and json.loads((ds / "aud_feat.json").read_text())["features"] == "mel"
    judge = [{k: v for k, v in r["metrics"].items() if k.startswith("sync_") and k.endswith("_true")} for r in (s, m)]
    assert judge[0] and judge[0] == judge[1]           # one judge (the mel SyncNet) for both sources


def test_protocol_auto_source_trains_its_judge(synthetic_clip, tmp_path, monkeypatch, capsys):
    """--audio_source auto (the default) on a recording long enough for the speech source: its
    SyncNet and features are the speech ones, the run is labelled so, and a mel SyncNet is trained
    beside it (no features) to judge the sync check, as for a mel run."""
    import syncnet_data
    assert protocol.Config().audio_source == "auto"
    monkeypatch.setattr(syncnet_data, "SPEECH_AUTO_S", 1.0)
    s = protocol.main(protocol.Config(train_video=str(synthetic_clip), heldout_video=str(synthetic_clip),
                                      out_dir=str(tmp_path), sync_steps=2, steps=1, widths="4,4,8,8,16,16", batch_size=2,
                                      eval_frames=40, threads=1, num_workers=0, baseline=False))
    assert "--audio_source auto: speech for this 6 s recording" in capsys.readouterr().out
    assert s["label"].endswith("_speech") and {"judge_s", "syncnet_s"} <= set(s["times"])
    ds, ckpt = tmp_path / "dataset" / "talk", tmp_path / "checkpoint"
    assert json.loads((ds / "aud_feat.json").read_text())["features"] == "speech"
    assert json.loads((ckpt / "talk" / "syncnet_config.json").read_text())["audio_source"] == "mel"
    assert json.loads((ckpt / "speech" / "talk" / "syncnet_config.json").read_text())["audio_source"] == "speech"
    judged = json.loads((ckpt / "speech" / "talk" / "runs" / s["label"] / "eval" / "metrics.json").read_text())
    assert judged["syncnet"]["checkpoint"] == str(ckpt / "talk" / "syncnet_best.pth")
    assert 0 <= s["metrics"]["sync_stretch_acc_gen"] <= 1
    with pytest.raises(UserError, match="--audio_source loud: use mel, speech, both or auto"):   # before any work
        protocol.main(protocol.Config(train_video=str(synthetic_clip), heldout_video=str(synthetic_clip),
                                      out_dir=str(tmp_path / "x"), audio_source="loud"))
    assert not (tmp_path / "x").exists()


def test_voices_name_the_shared_and_unseen_sets(tmp_path, monkeypatch):
    """--voices shared / unseen / both, mixed with a file: the named media in order; a missing one is an error."""
    monkeypatch.setattr(protocol, "MEDIA", tmp_path)
    for f in ("speech_b.wav", "speech_a.wav") + protocol.SPEAKERS + protocol.UNSEEN:
        (tmp_path / f).write_bytes(b"x")
    extra = tmp_path / "mine.wav"
    extra.write_bytes(b"x")
    assert protocol.voice_files("unseen") == [tmp_path / v for v in protocol.UNSEEN]
    both = protocol.voice_files(f"shared, unseen,{extra}")
    assert both == [tmp_path / "speech_a.wav", tmp_path / "speech_b.wav"] + [tmp_path / v for v in protocol.SPEAKERS + protocol.UNSEEN] + [extra]
    (tmp_path / protocol.UNSEEN[2]).unlink()
    with pytest.raises(UserError, match=f"--voices unseen: not found: .*{protocol.UNSEEN[2]}"):
        protocol.voice_files("unseen")
