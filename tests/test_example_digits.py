"""The end-to-end digits example runs, writes its JSON and plot, and serves what QAT computes."""

import importlib.util
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "digits_qat.py"
KEYS = {
  "float",
  "ptq_int8_minmax",
  "ptq_int8_percentile",
  "ptq_int8_entropy",
  "ptq_int8_mse",
  "qat_int8",
  "qat_int4",
  "qat_fp8_e4m3",
  "serve_int8",
  "serve_int8_matches_qat",
}


def _load_example():
  spec = importlib.util.spec_from_file_location("digits_qat", _PATH)
  module = importlib.util.module_from_spec(spec)
  # Registered before running it: dataclasses (Flax modules) look their module up in sys.modules.
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_digits_pipeline_small(tmp_path):
  example = _load_example()
  json_path, plot_path = tmp_path / "results.json", tmp_path / "digits_qat.png"
  # The fast configuration: 512 training images, 20 float epochs (320 steps), 2 QAT epochs per variant.
  results = example.run(
    epochs=20, qat_epochs=2, subset=512, seed=0, json_path=str(json_path), plot_path=str(plot_path), verbose=False
  )
  written = json.loads(json_path.read_text())
  assert set(written) == KEYS
  assert written == results
  # Float floor: 0.956 on x86-64 CPU; two test images (0.6 points) of room for another backend's rounding.
  assert written["float"] >= 0.94, written["float"]
  # QAT stays within 2 points of float for every format (int8 0.956, int4 0.958, fp8 0.956 here).
  for key in ("qat_int8", "qat_int4", "qat_fp8_e4m3"):
    assert written[key] >= written["float"] - 0.02, (key, written[key], written["float"])
  # PTQ int8 with the best calibration method is within 1 point of float (minmax, percentile and mse: 0.956).
  # Entropy is not held to it: it clips the one-sided ReLU inputs hard here (0.77).
  best_ptq = max(written[f"ptq_int8_{m}"] for m in ("minmax", "percentile", "mse"))
  assert best_ptq >= written["float"] - 0.01, best_ptq
  # Serving runs the same quantized arithmetic as the QAT forward, up to the float rounding of the final rescale:
  # at most one test prediction in 200 may flip, and the accuracies agree to that.
  assert written["serve_int8_matches_qat"] >= 0.995
  assert abs(written["serve_int8"] - written["qat_int8"]) <= 0.005
  assert plot_path.stat().st_size > 0
