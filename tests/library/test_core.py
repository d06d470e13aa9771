"""env, files, timing and results: the helpers every lab uses."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from labkit import env, files, results, timing


def test_pick_device_auto_and_explicit():
    assert env.pick_device("cpu") == torch.device("cpu")
    auto = env.pick_device("auto")
    assert auto.type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        assert auto.type in {"mps", "cpu"}
        with pytest.raises(ValueError, match="CUDA is not available"):
            env.pick_device("cuda")
    with pytest.raises(ValueError, match="'tpu'"):
        env.pick_device("tpu")


@pytest.mark.parametrize("avx512_bf16, amx, mkldnn_bf16, want", [
    (False, False, True, None),             # Skylake / Cascade Lake / Ice Lake: AVX-512, bf16 only emulated
    (True, False, True, torch.bfloat16),    # Cooper Lake, Zen 4: AVX512-BF16
    (False, True, True, torch.bfloat16),    # Sapphire Rapids and newer: AMX
    (True, True, True, torch.bfloat16),
    (False, False, False, None),            # AVX2-only
])
def test_amp_auto_on_cpu_is_bf16_only_where_the_cpu_runs_it_natively(monkeypatch, avx512_bf16, amx, mkldnn_bf16, want):
    """oneDNN's bf16 flag is true on every AVX-512 CPU; only AVX512-BF16 or AMX make bf16 faster than fp32."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: mkldnn_bf16, raising=False)
    assert env.amp_dtype("auto", torch.device("cpu")) is want
    assert env.use_channels_last(torch.device("cpu"), env.amp_dtype("auto", torch.device("cpu"))) is (want is not None)


def test_amp_auto_on_cpu_follows_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: True)
    assert env.amp_dtype("auto", cpu) is torch.bfloat16
    assert env.use_channels_last(cpu, torch.bfloat16)
    monkeypatch.setattr(env, "cpu_has_native_bf16", lambda: False)
    assert env.amp_dtype("auto", cpu) is None
    assert not env.use_channels_last(cpu, None)
    assert env.amp_dtype(False, cpu) is None
    assert env.amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        env.amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="amp='fp8'"):
        env.amp_dtype("fp8", cpu)


@pytest.mark.parametrize("native_bf16, want", [(False, torch.float16), (True, torch.bfloat16)],
                         ids=["T4/V100-like", "A100/H100-like"])
def test_amp_auto_on_gpu_bf16_only_where_native(monkeypatch, native_bf16, want):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native_bf16 or including_emulation  # emulated bf16 is "supported" on a T4 too
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    gpu = torch.device("cuda")
    dtype = env.amp_dtype("auto", gpu)
    assert dtype is want and calls == [False]
    scaler = env.grad_scaler(dtype, torch.device("cpu"))  # the scaler's type, not its device, is under test
    assert (scaler is not None) == (want is torch.float16)
    assert env.use_channels_last(gpu, dtype)
    assert env.precision_name(dtype) == ("fp16" if want is torch.float16 else "bf16")


def test_seed_everything_repeats_random_draws():
    env.seed_everything(3)
    a = torch.rand(4)
    env.seed_everything(3)
    assert torch.equal(a, torch.rand(4))


def test_environment_summary_fields():
    info = env.environment("cpu", world_size=2)
    for key in ("python", "torch", "cpu_count", "device", "device_name", "world_size"):
        assert key in info
    assert info["world_size"] == 2 and info["device"] == "cpu"


def test_project_root_finds_the_course_from_a_subfolder(tmp_path, monkeypatch):
    (tmp_path / "labs").mkdir()
    (tmp_path / "labkit").mkdir()
    sub = tmp_path / "results" / "executed"
    sub.mkdir(parents=True)
    monkeypatch.delenv("LABKIT_HOME", raising=False)
    monkeypatch.chdir(sub)
    assert env.project_root() == tmp_path.resolve()
    assert env.resolve_path("data/x") == tmp_path.resolve() / "data" / "x"
    assert env.resolve_path("/abs/y") == Path("/abs/y")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    files.write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_path_replaces_a_folder_whole(tmp_path):
    target = tmp_path / "folder"
    with files.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("1")
    with files.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]


def test_timer_and_throughput():
    t = timing.Timer()
    for _ in range(3):
        with t():
            sum(range(1000))
    assert len(t.times) == 3 and t.sum() >= t.avg() >= 0
    assert t.cumsum()[-1] == pytest.approx(t.sum())
    assert timing.throughput(100, 2.0) == 50 and timing.throughput(5, 0) == 0
    assert timing.format_seconds(75.2) == "1m 15s" and timing.format_seconds(3.21) == "3.2s"
    with pytest.raises(RuntimeError):
        timing.Timer().stop()


def test_record_round_trip(results_tmp):
    rec = results.RunRecord(lab="01_baseline", params={"epochs": 2}, env={"device": "cpu", "world_size": 1},
                            data={"synthetic": True},
                            epochs=[{"epoch": 1, "loss": 1.2, "seconds": 3.0}, {"epoch": 2, "loss": 0.9, "seconds": 2.0}],
                            final={"test_acc": torch.tensor(0.625)})
    plot = results.lab_dir("01_baseline") / "curves.png"
    plot.write_bytes(b"png")
    rec.add_artifact(plot)
    path = results.save(rec)
    assert path.parent == results_tmp / "01_baseline"
    back = results.load_record(path)
    assert back.final["test_acc"] == pytest.approx(0.625) and back.artifacts == ["01_baseline/curves.png"]
    assert results.latest("01_baseline").run_id == rec.run_id
    df = results.load()
    assert list(df["lab"]) == ["01_baseline"] and df.loc[0, "test_acc"] == pytest.approx(0.625)
    assert list(results.epochs_frame(back)["loss"]) == [1.2, 0.9]
    assert results.latest("02_ray") is None


def test_result_dirs_follow_the_design_names(results_tmp):
    assert results.lab_dir("03_imagenet_ddp_ablations").name == "03_ablations"
    assert results.lab_dir("06_streaming_data").name == "06_streaming"


def test_corrupt_record_is_named(results_tmp):
    bad = results.lab_dir("01_baseline") / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        results.load_record(bad)


def test_noise_of_a_difference_and_its_verdict():
    from labkit import metrics

    wide = metrics.accuracy_noise(0.6, 100, 0.62, 100)
    assert wide == pytest.approx(2 * (0.6 * 0.4 / 100 + 0.62 * 0.38 / 100) ** 0.5)
    assert metrics.accuracy_noise(0.6, 10_000, 0.62, 10_000) < wide / 5          # more images, less noise
    assert metrics.verdict(0.02, wide) == "within noise" and metrics.verdict(-0.3, wide) == "beyond noise"
    with pytest.raises(ValueError, match="acc_b=1.2"):
        metrics.accuracy_noise(0.5, 10, 1.2, 10)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = np.where(rng.random(300) < 0.8, y, (y + 1) % 3)
    close = np.where(rng.random(300) < 0.78, y, (y + 1) % 3)
    noise = metrics.paired_noise(y, good, close, rounds=300)
    assert 0 < noise < wide                       # pairing: tighter than the unpaired binomial bound
    assert metrics.paired_noise(y, good, good, rounds=50) == 0.0
    with pytest.raises(ValueError, match="one per test image"):
        metrics.paired_noise(y, good[:10], close)


def test_the_verdict_asks_whether_zero_lies_outside_the_interval():
    from labkit import metrics

    assert metrics.interval_verdict(-0.01, 0.05) == "within noise"
    assert metrics.interval_verdict(0.001, 0.05) == "beyond noise" and metrics.interval_verdict(-0.2, -0.1) == "beyond noise"
    assert metrics.interval_verdict(0.0, 0.0) == "within noise"          # no difference is never "beyond"
    # a skewed bootstrap interval: the difference is 0.02 and the half-width 0.03, but the interval [0.005, 0.065]
    # leaves 0 out — a symmetric ±half-width rule would have said "within noise"
    assert metrics.verdict(0.02, 0.03) == "within noise" and metrics.interval_verdict(0.005, 0.065) == "beyond noise"
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    strong = np.where(rng.random(400) < 0.95, y, 1 - y)
    weak = np.where(rng.random(400) < 0.6, y, 1 - y)
    low, high = metrics.paired_interval(y, strong, weak, rounds=300)
    assert 0 < low < high and metrics.interval_verdict(low, high) == "beyond noise"


def test_paired_difference_uses_student_t_at_n_minus_1_degrees_of_freedom():
    from scipy import stats

    from labkit import metrics

    judged = metrics.paired_difference([0.6, 0.7, 0.8], [0.5, 0.5, 0.5])     # differences 0.1, 0.2, 0.3
    bound = stats.t.ppf(0.975, 2) * 0.1 / 3 ** 0.5                            # t(2) = 4.30, s_d = 0.1
    assert judged["n"] == 3 and judged["diff"] == pytest.approx(0.2) and judged["bound"] == pytest.approx(bound)
    assert judged["verdict"] == "within noise"                               # 0.2 < 0.248: 3 seeds are not enough
    steady = metrics.paired_difference([0.62, 0.71, 0.55], [0.60, 0.69, 0.53])  # +0.02 on every seed
    assert steady["bound"] == pytest.approx(0.0, abs=1e-12) and steady["verdict"] == "beyond noise"
    assert metrics.paired_difference([0.5], [0.4])["verdict"] == "no spread measured"
    with pytest.raises(ValueError, match="same seeds"):
        metrics.paired_difference([0.5, 0.6], [0.4])
