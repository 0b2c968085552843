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
  "decode_bytes_per_s_window",
  "decode_bytes_per_s_window_float",
  "decode_bytes_per_s_window_int4",
  "decode_bytes_per_s_float",
  "decode_bytes_per_s_int8",
  "decode_bytes_per_s_int8_kv8",
  "decode_bytes_per_s_int4_kv8",
  "kv_cache_bytes_per_token_float",
  "kv_cache_bytes_per_token_int8",
  "ppl_cached_float",
  "ppl_int8_kvfloat",
  "ppl_int8_kv8",
  "ppl_int4_kv8",
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
  r = json.loads(out.read_text())
  assert set(r) == KEYS
  for key, value in r.items():
    assert math.isfinite(value), (key, value)
    if key.endswith("_ppl") or key.startswith("ppl_"):
      assert 1.0 < value < 257.0, (key, value)  # a byte model: between certainty and worse than uniform
  # Serving computes the QAT forward's integer dots; only the float rounding of the rescale differs.
  assert abs(r["serve_int8_ppl"] / r["qat_int8_ppl"] - 1) < 0.005, r
  # Through a float cache, one token at a time, the logits are the full forward's up to float32 rounding
  # (about 1e-6 relative per logit); the mean log-likelihood moves far less than 1e-4.
  assert abs(r["ppl_cached_float"] / r["float_ppl"] - 1) < 1e-4, r
  assert abs(r["ppl_int8_kvfloat"] / r["serve_int8_ppl"] - 1) < 1e-4, r
  # The int8 cache (and int8 attention products): the target, 0.5% of the float-cache perplexity.
  assert abs(r["ppl_int8_kv8"] / r["ppl_int8_kvfloat"] - 1) < 0.005, r
  # Bytes: head_dim 32 (as in the default model), int8 values plus a bfloat16 scale per token and head:
  # (32 + 2) / (32 * 4) = 0.2656 of the float32 cache, exactly.
  assert r["kv_cache_bytes_per_token_int8"] / r["kv_cache_bytes_per_token_float"] <= 0.27, r
  assert r["kv_cache_bytes_per_token_int8"] / r["kv_cache_bytes_per_token_float"] == (32 + 2) / 128, r
  # Speed: at context 32 a window re-run costs 32 token positions per byte where the cached step costs one,
  # but a tiny model is dominated by per-op overhead, unoptimized (level 0) and on a shared machine; the
  # 20x target is for the default model (README). Here the cache must still win clearly, by 1.5x at least.
  windows = {
    "float": r["decode_bytes_per_s_window_float"],
    "int8": r["decode_bytes_per_s_window"],
    "int8_kv8": r["decode_bytes_per_s_window"],
    "int4_kv8": r["decode_bytes_per_s_window_int4"],
  }
  for name, window in windows.items():
    assert r[f"decode_bytes_per_s_{name}"] > 1.5 * window, (name, r)
