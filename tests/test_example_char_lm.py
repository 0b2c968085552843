"""The transformer language-model example runs every stage end to end on a tiny configuration."""

import json
import math
import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "char_lm.py"
KEYS = {
  "float_ppl",
  "ptq_int8_ppl",
  "qat_int8_ppl",
  "qat_int4w_ppl",
  "serve_int8_ppl",
  "serve_int8_tokens_per_s",
  "float_tokens_per_s",
}


def test_char_lm_small_runs_every_stage(tmp_path):
  out = tmp_path / "results.json"
  env = dict(os.environ)
  # A separate process, so that this flag applies: the run is a dozen small compilations and few steps, and
  # XLA's backend optimizations would cost more time than they save.
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  cmd = [sys.executable, str(EXAMPLE), "--small", "--steps", "4", "--qat-steps", "3", "--json", str(out)]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  results = json.loads(out.read_text())
  assert set(results) == KEYS
  for key, value in results.items():
    assert math.isfinite(value), (key, value)
    if key.endswith("_ppl"):
      assert value > 1.0, (key, value)
    else:
      assert value > 0.0, (key, value)
  # Serving computes the QAT forward's integer dots; only the float rounding of the rescale differs.
  assert abs(results["serve_int8_ppl"] / results["qat_int8_ppl"] - 1) < 0.005, results
