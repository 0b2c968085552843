"""``benchmarks/gpu_check.py --smoke`` runs on CPU: every section, its table and its JSON."""

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
  spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["gpu_check"] = module  # its dataclasses (Flax modules) look themselves up there
  spec.loader.exec_module(module)
  return module


def test_smoke_serving_writes_the_figures(gpu_check, tmp_path, capsys):
  path = tmp_path / "gpu.json"
  results = gpu_check.main(["--smoke", "--json", str(path), "--sections", "serving"])
  written = json.loads(path.read_text())
  assert written["smoke"] is True and written["backend"] == results["backend"]
  (shape,) = written["serving"]
  r = written["serving"][shape]
  assert set(r["ms"]) == {"bf16", "raw int8", "jqat w8a8", "raw fp8", "jqat fp8"}
  for name, t in r["ms"].items():
    assert t > 0
    assert r["ratio_to_bf16"][name] == pytest.approx(t / r["ms"]["bf16"])
    assert r["ratio_to_raw_int8"][name] == pytest.approx(t / r["ms"]["raw int8"])
  # Quantized products are near the float64 product: int8 about 1e-2, fp8 e4m3 (3 mantissa bits) a few 1e-2.
  assert r["relative_rms_error"]["bf16"] < 1e-2
  assert r["relative_rms_error"]["jqat w8a8"] < 3e-2
  assert r["relative_rms_error"]["jqat fp8"] < 8e-2
  out = capsys.readouterr().out
  assert f"| {shape} |" in out and "| jqat fp8 |" in out


@pytest.mark.slow  # three QAT steps of the block compile: ~15-30 s on two cores
def test_smoke_qat_step(gpu_check, tmp_path, capsys):
  path = tmp_path / "gpu.json"
  gpu_check.main(["--smoke", "--json", str(path), "--sections", "qat_step"])
  q = json.loads(path.read_text())["qat_step"]
  assert set(q["ms"]) == {"bf16", "jqat int8", "jqat fp8"}
  for name, t in q["ms"].items():
    assert q["ratio_to_bf16"][name] == pytest.approx(t / q["ms"]["bf16"])
  # One step from the same initial parameters: the quantized losses are near the bf16 one.
  losses = q["first_loss"]
  assert all(abs(v - losses["bf16"]) < 0.1 * losses["bf16"] for v in losses.values()), losses
  assert "| jqat int8 |" in capsys.readouterr().out


def test_fp8_tests_section_reports_the_run(gpu_check):
  # The narrowest run: one fp8 test of one file, to check the command and the parsing of its summary.
  p = gpu_check.fp8_tests(smoke=True, timeout=120, extra=["-x", "--maxfail=1"])
  assert p["exit_code"] == 0, p
  assert "passed" in p["summary"] and "-k fp8" in p["command"]
