"""Speech recognition (issue 16): tiny random wav2vec2 (CTC) and Whisper built from transformers' config classes,
exported by optimum, built end to end. A random model's transcripts are garbage, but FP32-vs-compressed agreement is
still a real check: the metrics below are computed, not assumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgecompress import audio
from edgecompress.errors import BundleTampered, DataError
from edgecompress.speech import word_error_rate

REPO = Path(__file__).resolve().parents[1]
TARGETS = sorted(p.stem for p in (REPO / "targets").glob("*.toml"))
# phone-arm64 is built by test_whisper_phone_build_every_component
OTHER_TARGETS = [t for t in TARGETS if t != "phone-arm64"]


def _wav2vec2(path: Path) -> Path:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

    torch.manual_seed(0)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4,
             **{c: i + 5 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2CTCTokenizer(str(path / "vocab.json")).save_pretrained(path)
    cfg = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, pad_token_id=0,
                         do_stable_layer_norm=True, feat_extract_norm="layer", architectures=["Wav2Vec2ForCTC"])
    Wav2Vec2ForCTC(cfg).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True,
                             return_attention_mask=True).save_pretrained(path)
    return path


def _whisper(path: Path) -> Path:
    """2+2 layers, d_model 32, a byte-level tokenizer with Whisper's special tokens (init_std 0.2: transcripts
    vary with the audio instead of repeating one token)."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    torch.manual_seed(0)
    (path / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(bytes_to_unicode().values())}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    specials = ["<|startoftranscript|>", "<|en|>", "<|translate|>", "<|transcribe|>", "<|notimestamps|>"]
    end = "<|endoftext|>"
    tok = WhisperTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), additional_special_tokens=specials,
                           unk_token=end, bos_token=end, eos_token=end, pad_token=end)
    eos = tok.convert_tokens_to_ids(end)
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, encoder_layers=2, decoder_layers=2, d_model=32,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=1500, max_target_positions=64, pad_token_id=eos, bos_token_id=eos,
                        eos_token_id=eos, decoder_start_token_id=tok.convert_tokens_to_ids(specials[0]),
                        begin_suppress_tokens=None, suppress_tokens=None, init_std=0.2,
                        architectures=["WhisperForConditionalGeneration"])
    model = WhisperForConditionalGeneration(cfg).eval()
    model.generation_config.forced_decoder_ids = None
    model.save_pretrained(path)
    tok.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _wav2vec2(tmp_path_factory.mktemp("tiny-wav2vec2"))


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _whisper(tmp_path_factory.mktemp("tiny-whisper"))


def _build(model: Path, target: str, out: Path, *extra: str) -> tuple[int, str]:
    from edgecompress.cli import main

    res = CliRunner().invoke(main, ["build", str(model), "--target", target, "--out", str(out), "--force",
                                    "--runs", "3", *extra])
    return res.exit_code, res.output


# --- data and metrics ------------------------------------------------------------------------------------------
def test_word_error_rate() -> None:
    assert word_error_rate(["a b c d", "x y"], ["a b e d", "x y"]) == pytest.approx(1 / 6)
    assert word_error_rate(["a b"], ["a b c"]) == pytest.approx(0.5)  # an insertion
    assert word_error_rate(["", "a"], ["b c", "a"]) == pytest.approx(2.0)  # words for an empty reference: insertions
    assert word_error_rate(["abcd"], ["abxd"], chars=True) == pytest.approx(0.25)


def test_builtin_audio_and_a_directory(tmp_path: Path) -> None:
    import soundfile

    ev = audio.builtin_audio("evaluation")
    assert len(ev.files) == 6 and all(label for label in ev.labels)
    clip = audio.read_clip(ev.files[0])
    assert clip.dtype == np.float32 and 0.5 < len(clip) / audio.SAMPLE_RATE < 10
    # a user's directory: a 44.1 kHz stereo wav with a transcript beside it, a flac without
    rng = np.random.default_rng(0)
    soundfile.write(tmp_path / "a.wav", rng.standard_normal((44100, 2)).astype(np.float32) * 0.1, 44100)
    (tmp_path / "a.txt").write_text("Hello there\n")
    (tmp_path / "sub").mkdir()
    soundfile.write(tmp_path / "sub" / "b.flac", rng.standard_normal(8000).astype(np.float32) * 0.1, 16000)
    got = audio.load_audio_data(tmp_path)
    assert [f.name for f in got.files] == ["a.wav", "b.flac"] and got.labels == ("Hello there", None)
    assert len(audio.read_clip(got.files[0])) == 16000  # resampled to 16 kHz mono
    before = got.digest()
    (tmp_path / "a.txt").write_text("hello")
    assert audio.load_audio_data(tmp_path).digest() != before  # transcripts are part of the cache key


@pytest.mark.parametrize("content, why", [(None, "holds no audio files"), (b"not audio", "not a readable")])
def test_bad_audio_data(tmp_path: Path, content: bytes | None, why: str) -> None:
    if content is not None:
        (tmp_path / "x.wav").write_bytes(content)
    with pytest.raises(DataError, match=why):
        audio.load_audio_data(tmp_path)


# --- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_wav2vec2_ctc_build(tiny_wav2vec2: Path, tmp_path: Path) -> None:
    code, output = _build(tiny_wav2vec2, "host", tmp_path / "b", "--recipe", "int8-dynamic")
    assert code in (0, 3), output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["source"]["task"] == "automatic-speech-recognition"
    fid = m["fidelity"]["metrics"]
    assert 0 <= fid["wer"] <= 1 and 0.9 <= fid["token_top1"] <= 1  # int8 follows FP32 on most CTC frames
    assert "wer_reference" in fid  # the built-in clips carry reference transcripts
    assert m["kernels"]["integer_matmul_flops_share"] > 0
    assert (tmp_path / "b" / "preprocessor_config.json").is_file()
    from optimum.onnxruntime import ORTModelForCTC  # the bundle loads as is in optimum

    ORTModelForCTC.from_pretrained(tmp_path / "b")


@pytest.mark.slow
def test_whisper_phone_build_every_component(tiny_whisper: Path, tmp_path: Path) -> None:
    """The done-when build: static int8 on all three components, each verified by the manifest, loadable by
    optimum's ORTModelForSpeechSeq2Seq, transcripts against FP32's in the report."""
    out = tmp_path / "b"
    code, output = _build(tiny_whisper, "phone-arm64", out)
    assert code in (0, 3), output
    m = json.loads((out / "manifest.json").read_text())
    names = ("encoder_model", "decoder_model", "decoder_with_past_model")
    assert m["artifact"]["file"] == "encoder_model.onnx"
    for n in names:
        assert f"{n}.onnx" in m["artifact"]["hashes"] or m["artifact"]["file"] == f"{n}.onnx"
        assert any(r["modified"] for r in m["recipe"]["components"][n])
    assert all(k["integer_matmul_flops_share"] > 0 for k in m["kernels"]["components"].values())
    assert m["profile"]["workload"]["decode_steps"] == 40  # 10 s of audio at 4 tokens/s
    fid = m["fidelity"]
    assert set(fid["metrics"]) >= {"wer", "cer", "token_top1", "wer_reference"}
    assert fid["per_text"]["examples"][0]["fp32"]
    html = (out / "report.html").read_text()
    assert fid["per_text"]["examples"][0]["clip"] in html
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    ORTModelForSpeechSeq2Seq.from_pretrained(out)
    # a changed decoder is caught by the manifest's hashes
    from edgecompress.profiling import read_bundle

    read_bundle(out)
    with open(out / "decoder_with_past_model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleTampered, match=r"decoder_with_past_model\.onnx"):
        read_bundle(out)


@pytest.mark.slow
@pytest.mark.parametrize("target", OTHER_TARGETS)
def test_whisper_builds_on_every_target(tiny_whisper: Path, tmp_path: Path, target: str) -> None:
    code, output = _build(tiny_whisper, target, tmp_path / "b", "--package", "none")
    assert code in (0, 3), output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {r["name"] for r in m["budgets"]} >= {"size", "latency_p90", "wer"}


def test_speech_data_flag_errors(tiny_wav2vec2: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, output = _build(tiny_wav2vec2, "host", tmp_path / "b", "--eval", str(tmp_path / "empty"))
    assert code == 2 and "holds no audio files" in output and "Traceback" not in output
    assert not (tmp_path / "b").exists()
    no_pre = tmp_path / "no-pre"
    shutil.copytree(tiny_wav2vec2, no_pre)
    (no_pre / "preprocessor_config.json").unlink()
    code, output = _build(no_pre, "host", tmp_path / "b")
    assert code == 2 and "preprocessor_config.json" in output
