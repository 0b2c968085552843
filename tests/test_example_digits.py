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
  results = example.run(
    epochs=3, qat_epochs=1, subset=256, seed=0, json_path=str(json_path), plot_path=str(plot_path), verbose=False
  )
  written = json.loads(json_path.read_text())
  assert set(written) == KEYS
  assert written == results
  for key, value in written.items():
    assert 0.0 <= value <= 1.0, (key, value)
  # Serving runs the same quantized arithmetic as the QAT forward, up to the float rounding of the final rescale:
  # predictions agree however briefly the model was trained.
  assert written["serve_int8_matches_qat"] >= 0.995
  assert plot_path.stat().st_size > 0
