"""The GPU benchmark's code path, dry-run on the CPU (``--device cpu --smoke``), and its refusal without CUDA.

The benchmarks themselves measure speed; these tests only check that the GPU one runs and prints its table
(no timing is asserted), so that it works on the day a GPU is there.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GPU = ROOT / "benchmarks" / "gpu.py"


def _load_gpu_module():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu", GPU)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GPU), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_gpu_benchmark_dry_run_on_cpu_prints_every_row_of_the_table():
    proc = _run("--device", "cpu", "--smoke")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    header = next((line for line in out.splitlines() if line.startswith("row ")), None)
    assert header is not None and "img/s" in header and "MFU" in header, out
    expected = ["Lab 01 CNN 32px fp32", "Lab 01 CNN 32px + AMP", "Lab 01 CNN 32px + channels_last",
                "Lab 01 full epoch, 24 images", "ResNet-50 32px AMP", "input pipeline alone: BatchAugment"]
    for label in expected:
        line = next((line for line in out.splitlines() if line.startswith(label)), None)
        assert line is not None, f"row {label!r} missing from:\n{out}"
        rate = re.search(r"\s([\d,]+(?:\.\d+)?)\s", line[len(label):])
        assert rate and float(rate.group(1).replace(",", "")) > 0, line
    assert re.search(r"Lab 01 CNN [\d.]+ GFLOP, ResNet-50 [\d.]+ GFLOP", out), out
    assert "dry run on the CPU" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the benchmark would run")
def test_gpu_benchmark_refuses_without_cuda_with_exit_code_2_and_says_what_to_do():
    proc = _run(timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "torch.cuda.is_available() is False" in proc.stderr
    assert "--device cpu --smoke" in proc.stderr
    assert "img/s" not in proc.stdout  # it stopped before measuring anything


def test_peak_table_matches_gpu_names_and_leaves_others_unknown():
    gpu = _load_gpu_module()
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu.peak_tflops("NVIDIA H200") == 989.0
    assert gpu.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert gpu.peak_tflops("NVIDIA L4") == 121.0
    assert gpu.peak_tflops("Tesla T4") == 65.0
    assert gpu.peak_tflops("Tesla V100-SXM2-16GB") == 125.0
    assert gpu.peak_tflops("NVIDIA L40S") is None       # not an L4
    assert gpu.peak_tflops("NVIDIA GeForce RTX 4090") is None
