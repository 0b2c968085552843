"""The quantize-any-model example runs every stage end to end on a tiny configuration."""

import json
import math
import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "quantize_any_model.py"
KEYS = {
  "float_loss",
  "float_loss_same_steps",
  "quantized_loss_before_qat",
  "qat_loss",
  "calibrated_loss",
  "served_loss",
  "served_matches_qat",
  "float_bytes",
  "served_bytes",
  "quantized_ops_float_bytes",
  "quantized_ops_served_bytes",
  "seconds",
}


def test_the_model_code_imports_nothing_from_jqat():
  source = EXAMPLE.read_text()
  model_code = source[source.index("# --- the model") : source.index("# --- data")]
  assert "jqat" not in model_code.replace("(no jqat)", "")


def test_quantize_any_model_small_runs_every_stage(tmp_path):
  out = tmp_path / "results.json"
  env = dict(os.environ)
  # A separate process, so that this flag applies: a dozen small compilations and a few steps, for which
  # XLA's backend optimizations cost more time than they save.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  proc = subprocess.run(
    [sys.executable, str(EXAMPLE), "--small", "--json", str(out)], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "layers/mlp_in" in proc.stdout and "total" in proc.stdout  # the report table
  r = json.loads(out.read_text())
  assert set(r) == KEYS
  assert all(math.isfinite(v) for v in r.values()), r
  for key in (
    "float_loss",
    "float_loss_same_steps",
    "quantized_loss_before_qat",
    "qat_loss",
    "calibrated_loss",
    "served_loss",
  ):
    assert 0 < r[key] < 6.0, (key, r[key])  # below log(256) = 5.55 plus slack: a trained byte model
  # Serving computes the integer dots of the QAT forward; only the rescale's float rounding differs.
  assert abs(r["served_loss"] - r["calibrated_loss"]) < 1e-3 * r["calibrated_loss"], r
  assert r["served_matches_qat"] > 0.99, r
  # int8 weights with per-channel scales and sums; the tied embedding stays float.
  assert r["quantized_ops_served_bytes"] < 0.31 * r["quantized_ops_float_bytes"], r
  assert r["served_bytes"] < r["float_bytes"], r
