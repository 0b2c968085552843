"""NaN and Inf in the data: the outputs they touch come out non-finite, as in float, in QAT and in serving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jqat

MATMUL = (((1,), (0,)), ((), ()))
ACT = jqat.QatConfig(symmetric=False)


def _data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((5, 8)).astype(np.float32)
  w = (rng.standard_normal((8, 4)) * 0.3).astype(np.float32)
  return x, w


def _bad_lhs():
  x, w = _data()
  x[1, 3] = np.nan
  x[3, 0] = np.inf
  return x, w


def _qat(x, w, wcfg):
  xqp = jqat.qparams_from_array(x, ACT)  # the finite range: NaN and Inf are left out
  wqp = jqat.qparams_from_array(w, wcfg)
  return jqat.qat_dot_general(x, w, MATMUL, xqp, wqp, lhs_config=ACT, rhs_config=wcfg)


WEIGHT_CONFIGS = {
  "int8": jqat.QatConfig(per_channel=True),  # the integer forward
  "int4_group": jqat.QatConfig(bits="int4", per_channel=True, group_size=4),  # the float forward
  "fp8": jqat.QatConfig(bits="fp8"),
}


@pytest.mark.parametrize("wname", sorted(WEIGHT_CONFIGS))
def test_qat_dot_rows_and_columns_that_meet_nan_are_non_finite(wname):
  wcfg = WEIGHT_CONFIGS[wname]
  x, w = _bad_lhs()
  w[6, 2] = np.nan
  y = np.asarray(jax.jit(_qat, static_argnums=2)(x, w, wcfg))
  # The same cells as the float dot: rows 1 and 3 (lhs) and column 2 (rhs); the rest finite.
  np.testing.assert_array_equal(np.isfinite(y), np.isfinite(x @ w))
  assert np.isfinite(y).sum() == 3 * 3


def test_qat_dot_gradients_through_nan_are_nan_as_in_float():
  x, w = _data()
  x[1, 3] = np.nan
  t = np.zeros((5, 4), np.float32)
  wcfg = WEIGHT_CONFIGS["int8"]

  def loss(dot):
    return lambda x, w: jnp.sum((dot(x, w) - t) ** 2)

  qat = jax.jit(jax.grad(loss(lambda x, w: _qat(x, w, wcfg)), argnums=(0, 1)))
  flt = jax.jit(jax.grad(loss(jnp.dot), argnums=(0, 1)))
  for g, f in zip(qat(x, w), flt(x, w)):
    np.testing.assert_array_equal(np.isnan(g), np.isnan(f))
  gx, gw = qat(x, w)
  assert np.isnan(gx[1]).all() and np.isfinite(np.delete(gx, 1, axis=0)).all() and np.isnan(gw).all()


def test_fake_quant_gradient_passes_a_nan_input():
  cfg = jqat.QatConfig()
  qp = jqat.qparams_from_range(-1.0, 1.0, cfg)
  x = jnp.array([jnp.nan, 0.5, 3.0])
  y = jqat.fake_quant(x, qp, cfg)
  assert np.isnan(y[0]) and np.isfinite(y[1:]).all()
  g = jax.grad(lambda x: jnp.sum((jqat.fake_quant(x, qp, cfg) - 1.0) ** 2))(x)
  # NaN where float gives NaN (it used to be a silent 0), the clipped element still 0.
  assert np.isnan(g[0]) and g[2] == 0.0 and np.isfinite(g[1])


def test_quantize_makes_the_block_of_a_nan_visible():
  x, _ = _bad_lhs()
  per_token = jqat.QatConfig(symmetric=False, per_channel=True, channel_axis=0)
  q = jqat.quantize(x, jqat.qparams_from_array(x, per_token), per_token)
  s = np.asarray(q.scale).reshape(-1)
  assert np.isnan(s[[1, 3]]).all() and np.isfinite(np.delete(s, [1, 3])).all()
  d = np.asarray(jqat.dequantize(q))
  assert np.isnan(d[[1, 3]]).all() and np.isfinite(np.delete(d, [1, 3], axis=0)).all()


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_int_dot_general_outputs_that_meet_nan_are_non_finite(bits):
  x, w = _bad_lhs()
  wcfg = jqat.QatConfig(bits=bits, per_channel=True)
  wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)
  per_token = jqat.QatConfig(bits=bits, symmetric=False, per_channel=True, channel_axis=0)
  per_tensor = jqat.QatConfig(bits=bits, symmetric=False)

  @jax.jit
  def serve(x, wq):
    out = []
    for cfg in (per_token, per_tensor):
      xq = jqat.quantize(x, jqat.qparams_from_array(x, cfg), cfg)
      out.append(jqat.int_matmul(xq, wq))
    return out

  y_token, y_tensor = (np.asarray(t) for t in serve(x, wq))
  # Per token: exactly the rows of the float dot; per tensor: the whole output (one scale for every row).
  np.testing.assert_array_equal(np.isfinite(y_token), np.isfinite(x @ w))
  assert not np.isfinite(y_tensor).any()


def test_weight_only_matmul_rows_that_meet_nan_are_non_finite():
  x, w = _bad_lhs()
  wcfg = jqat.QatConfig(per_channel=True)
  wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)
  y = np.asarray(jax.jit(jqat.weight_only_matmul)(x, wq))
  np.testing.assert_array_equal(np.isfinite(y), np.isfinite(x @ w))


def test_int_conv_output_is_non_finite_after_a_nan_input():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
  x[1, 2, 2, 0] = np.nan
  w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  wcfg = jqat.QatConfig(per_channel=True)
  wq = jqat.quantize(w, jqat.qparams_from_array(w, wcfg), wcfg)

  @jax.jit
  def conv(x, wq):
    xq = jqat.quantize(x, jqat.qparams_from_array(x, ACT), ACT)
    return jqat.int_conv_general_dilated(xq, wq, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  y = np.asarray(conv(x, wq))
  # One scale for the whole input: every output is NaN, never a plausible number.
  assert np.isnan(y).all()
  x[1, 2, 2, 0] = 0.0
  assert np.isfinite(np.asarray(conv(x, wq))).all()


def _rows_with_nan_inf_and_minus_inf():
  # Wide enough rows that XLA:CPU runs its vectorized reductions.
  x = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
  x[2, 100], x[7, 511], x[11, 0] = np.nan, np.inf, -np.inf
  return x


def test_quantize_under_jit_marks_exactly_the_blocks_with_nan_or_inf_and_keeps_the_others():
  x = _rows_with_nan_inf_and_minus_inf()
  per_token = jqat.QatConfig(symmetric=False, per_channel=True, channel_axis=0)
  qp = jqat.qparams_from_array(x, per_token)
  q = jax.jit(lambda x, qp: jqat.quantize(x, qp, per_token))(x, qp)
  s = np.asarray(q.scale).reshape(-1)
  bad = [2, 7, 11]
  assert np.isnan(s[bad]).all() and np.isfinite(np.delete(s, bad)).all()
  # The finite rows: the scale as given, and the values of those rows quantized on their own.
  np.testing.assert_array_equal(np.delete(s, bad), np.delete(np.asarray(qp.scale).reshape(-1), bad))
  good = np.delete(x, bad, axis=0)
  ref = jqat.quantize(good, jqat.qparams_from_array(good, per_token), per_token)
  np.testing.assert_array_equal(np.delete(np.asarray(q.values), bad, axis=0), np.asarray(ref.values))


def test_nonfinite_out_marks_exactly_the_rows_and_columns_that_meet_nan_or_inf():
  from jqat._src import int_kernels

  x = _rows_with_nan_inf_and_minus_inf()
  w = np.ones((512, 8), np.float32)
  w[300, 5] = -np.inf
  mark = np.asarray(jax.jit(lambda x, w: int_kernels.nonfinite_out(x, w, MATMUL))(x, w))
  expected = np.zeros((16, 8), bool)
  expected[[2, 7, 11], :] = True
  expected[:, 5] = True
  np.testing.assert_array_equal(np.isnan(mark), expected)
  assert (mark[~expected] == 0).all()


def test_quantize_writes_no_float_copy_of_its_input():
  # The NaN check is one reduction that reads x; no float tensor of x's shape is written out beside the values.
  cfg = jqat.QatConfig(symmetric=False)
  x = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
  qp = jqat.qparams_from_array(x, cfg)
  hlo = jax.jit(lambda x, qp: jqat.quantize(x, qp, cfg)).lower(x, qp).compile().as_text()
  body = hlo[hlo.index("ENTRY") :].splitlines()[1:]
  written = [line for line in body if "= f32[64,256]" in line and "parameter(" not in line]
  assert not written, written


TOKEN = jqat.QatConfig(per_channel=True)  # dynamic per-token activation ranges


def _big_bad_lhs():
  """Rows long enough for XLA:CPU's vectorized reductions (which do not propagate NaN); NaN / Inf also last in a row."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((64, 256)).astype(np.float32)
  w = (rng.standard_normal((256, 4)) * 0.1).astype(np.float32)
  x[1, 3] = np.nan
  x[3, 255] = np.inf
  x[7, 255] = np.nan
  x[9, 0] = -np.inf
  return x, w


BAD_ROWS = [1, 3, 7, 9]


def _per_token_layer(api, w):
  """A per-token QAT dense layer with kernel ``w``, in linen or NNX, as a jitted ``x -> y``."""
  import functools

  import flax.linen as nn
  from flax import nnx

  if api == "linen":
    layer = nn.Dense(4, use_bias=False, dot_general_cls=functools.partial(jqat.linen.QatDotGeneral, lhs_config=TOKEN))
    return jax.jit(lambda x: layer.apply({"params": {"kernel": w}, "quant_stats": {}}, x, mutable=["quant_stats"])[0])
  layer = jqat.nnx.QatDense(w.shape[0], 4, use_bias=False, activation_config=TOKEN, rngs=nnx.Rngs(0))
  layer.kernel.set_value(jnp.asarray(w))
  return functools.partial(nnx.jit(lambda layer, x: layer(x)), layer)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_per_token_layer_marks_exactly_the_rows_that_meet_nan_or_inf(api):
  x, w = _big_bad_lhs()
  fn = _per_token_layer(api, w)
  y = np.asarray(fn(x))
  np.testing.assert_array_equal(np.isfinite(y), np.isfinite(x @ w))
  # The other rows: each token quantized with its own range, as fake_quant computes it.
  xcfg = jqat.QatConfig(per_channel=True, channel_axis=0)  # the rows of x: what the layer does with TOKEN
  wcfg = jqat.QatConfig(per_channel=True)
  xqp, wqp = jqat.qparams_from_array(x, xcfg), jqat.qparams_from_array(w, wcfg)
  ref = np.asarray(jqat.fake_quant(x, xqp, xcfg)) @ np.asarray(jqat.fake_quant(w, wqp, wcfg))
  good = [i for i in range(len(x)) if i not in BAD_ROWS]
  np.testing.assert_allclose(y[good], ref[good], rtol=1e-5, atol=1e-5)
  # A row's outputs do not depend on the other rows (per-token ranges): the clean input gives the same rows.
  clean = x.copy()
  clean[BAD_ROWS] = 0.5
  np.testing.assert_array_equal(np.asarray(fn(clean))[good], y[good])


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_moving_average_layer_marks_the_rows_that_meet_nan_and_skips_them_in_its_range(api):
  import functools

  import flax.linen as nn
  from flax import nnx

  x, w = _big_bad_lhs()
  if api == "linen":
    layer = nn.Dense(4, use_bias=False, dot_general_cls=functools.partial(jqat.linen.QatDotGeneral, lhs_config=ACT))
    stats = layer.init(jax.random.key(0), x)["quant_stats"]
    variables = {"params": {"kernel": w}, "quant_stats": stats}
    y, upd = jax.jit(lambda x: layer.apply(variables, x, mutable=["quant_stats"]))(x)
    (ema,) = [v.ema for v in jax.tree.leaves(upd, is_leaf=lambda v: hasattr(v, "ema"))]
  else:
    model = jqat.nnx.QatDense(w.shape[0], 4, use_bias=False, activation_config=ACT, rngs=nnx.Rngs(0))
    model.kernel.set_value(jnp.asarray(w))
    y = nnx.jit(lambda m, x: m(x))(model, x)
    ema = model.dot_general.lhs_stats.get_value().ema
  y = np.asarray(y)
  np.testing.assert_array_equal(np.isfinite(y), np.isfinite(x @ w))
  # The first batch sets the range to its finite values' range; the four bad values are skipped and counted.
  finite = x[np.isfinite(x)]
  assert float(ema.min.reshape(())) == finite.min() and float(ema.max.reshape(())) == finite.max()
  assert int(ema.count) == finite.size and int(ema.nonfinite) == 4
  wcfg = jqat.QatConfig(per_channel=True)
  xqp, wqp = jqat.qparams_from_array(x, ACT), jqat.qparams_from_array(w, wcfg)
  ref = np.asarray(jqat.fake_quant(x, xqp, ACT)) @ np.asarray(jqat.fake_quant(w, wqp, wcfg))
  good = [i for i in range(len(x)) if i not in BAD_ROWS]
  np.testing.assert_allclose(y[good], ref[good], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [64, 4096, 65536])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_plain_range_is_exact_for_finite_blocks_and_marks_the_others(n, where):
  from jqat._src import qparams

  x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
  pos = {"first": 0, "middle": n // 2, "last": n - 1}[where]
  x[1, pos] = np.nan
  x[2, pos] = np.inf
  lo, hi, mark = (np.asarray(r) for r in jax.jit(lambda v: qparams.plain_range(v, axis=1))(x))
  amax, amark = (np.asarray(r) for r in jax.jit(lambda v: qparams.plain_amax(v, axis=1))(x))
  assert (lo[0], hi[0], amax[0]) == (x[0].min(), x[0].max(), np.abs(x[0]).max())
  # The marks, not the (XLA:CPU: NaN-dropping) min and max, say which blocks are not finite.
  assert mark[0] == 0 and amark[0] == 0 and np.isnan(mark[1:]).all() and np.isnan(amark[1:]).all()


@pytest.mark.parametrize("method", ["minmax", "moving_average"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_range_statistics_skip_and_count_nan_in_large_batches(method, per_channel):
  # Vectorized min / max reductions of XLA:CPU drop a NaN (or restart a lane after it): the statistics must not.
  x = np.random.default_rng(2).standard_normal((512, 256)).astype(np.float32)
  x[511, 255] = np.nan
  x[0, 7] = np.nan  # NaN alone: with an Inf in the batch, the masked pass would run anyway
  cfg = jqat.QatConfig(per_channel=per_channel)
  state = jax.jit(jqat.update_stats)(jqat.init_stats(x.shape, cfg, method), x)
  masked = np.where(np.isfinite(x), x, np.nan)
  axis = 0 if per_channel else None
  np.testing.assert_array_equal(np.asarray(state.min).reshape(-1), np.atleast_1d(np.nanmin(masked, axis=axis)))
  np.testing.assert_array_equal(np.asarray(state.max).reshape(-1), np.atleast_1d(np.nanmax(masked, axis=axis)))
  assert int(state.nonfinite) == 2 and int(state.count) == x.size - 2


def test_qat_kernel_columns_that_hold_nan_are_marked_in_large_layers():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((32, 512)).astype(np.float32)
  w = (rng.standard_normal((512, 64)) * 0.05).astype(np.float32)
  w[511, 5] = np.nan
  w[0, 9] = np.nan
  w[200, 63] = np.nan
  layer = jqat.linen.QatDense(64, use_bias=False)
  stats = layer.init(jax.random.key(0), x)["quant_stats"]
  y, _ = jax.jit(lambda x, w: layer.apply({"params": {"kernel": w}, "quant_stats": stats}, x, mutable=True))(x, w)
  np.testing.assert_array_equal(np.isfinite(np.asarray(y)), np.isfinite(x @ w))
  assert np.isfinite(np.asarray(y)).sum() == 32 * 61


def test_kv_quantize_marks_vectors_that_hold_nan():
  from jqat._src import kv_cache

  x = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)
  x[2, 255] = np.nan
  x[5, 0] = np.nan
  values, scale = jax.jit(lambda v: kv_cache.kv_quantize(v, kv_cache.KVCacheConfig()))(x)
  assert np.isnan(np.asarray(scale, np.float32).reshape(-1)).tolist() == [i in (2, 5) for i in range(8)]
