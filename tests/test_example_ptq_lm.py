"""The PTQ language-model example on a tiny configuration: its outliers keep the float function, GPTQ beats RTN."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jqat
from jqat._src.flax.linen_ptq import served_kernel

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "ptq_lm.py"
_spec = importlib.util.spec_from_file_location("ptq_lm", EXAMPLE)
ptq_lm = importlib.util.module_from_spec(_spec)
sys.modules["ptq_lm"] = ptq_lm  # its dataclasses look their module up
_spec.loader.exec_module(ptq_lm)

S = ptq_lm.Settings(**ptq_lm.SMALL)
TOKENS = jax.random.randint(jax.random.key(0), (4, S.context), 0, 256)
PARAMS = jax.jit(ptq_lm.LM(S).init)(jax.random.key(1), TOKENS)["params"]


def test_json_keys_are_the_documented_ones():
  fmts = ("int4pc", "int4g128", "int3g128")
  want = {"ppl_float", "ppl_qat_int4pc", "ppl_w8a8_plain", "ppl_w8a8_smoothquant"}
  want |= {f"ppl_{m}_{f}" for m in ("rtn", "gptq", "awq") for f in fmts}
  assert set(ptq_lm.KEYS) == want and len(ptq_lm.KEYS) == len(want)


def test_outliers_keep_the_float_function_and_grow_the_channels():
  model = ptq_lm.LM(S)
  moved = ptq_lm.add_outliers(PARAMS, S)
  a, b = (jax.jit(model.apply)({"params": p}, TOKENS) for p in (PARAMS, moved))
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # float rounding of x * g and w / g
  gains = moved["block_0"]["ln_attn"]["scale"] / PARAMS["block_0"]["ln_attn"]["scale"]
  assert int(jnp.sum(jnp.isclose(gains, ptq_lm.OUTLIER_GAIN))) == ptq_lm.OUTLIERS


def test_small_run_gptq_below_rtn_and_served_equals_dequantized():
  keep = {}
  r = ptq_lm.run(S, variants=["ppl_rtn_int4pc", "ppl_gptq_int4pc"], log=lambda *_: None, keep=keep)
  assert set(r) == {"ppl_float", "ppl_rtn_int4pc", "ppl_gptq_int4pc"}
  assert all(np.isfinite(v) and 1.0 < v < 256.0 for v in r.values()), r  # between certainty and uniform bytes
  assert r["ppl_gptq_int4pc"] < r["ppl_rtn_int4pc"], r
  assert r["ppl_float"] < r["ppl_rtn_int4pc"], r
  # The served GPTQ model is the float model with its kernels replaced by the dequantized served ones.
  cfg = ptq_lm.weight_formats(S)["int4pc"]
  served, sim = keep["ppl_gptq_int4pc"], jax.tree.map(lambda a: a, keep["params"])
  for name, shape in (("qkv", (32, 96)), ("out", (32, 32)), ("mlp_in", (32, 128)), ("mlp_out", (128, 32))):
    q, s = served_kernel(served, ("block_0", name, "quant"), cfg, shape)
    assert s is None
    sim["block_0"][name] = {**sim["block_0"][name], "kernel": jqat.dequantize(q)}
  got = jax.jit(ptq_lm.LM(S, weight_config=cfg).apply)(served, TOKENS)
  want = jax.jit(ptq_lm.LM(S).apply)({"params": sim}, TOKENS)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # weight-only dot vs float dot, same values
