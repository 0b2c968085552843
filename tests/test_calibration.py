"""Statistics states, exact merging, bad data and the PyTree helpers of calibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jqat

NUM_BINS = 4096  # the smallest histogram: quick to update, same code paths

_update = jax.jit(jqat.update_stats)
_merge = jax.jit(jqat.merge_stats)
_finalize = jax.jit(jqat.finalize_stats, static_argnames=("config", "method", "percentile"))


def _init(shape, cfg, method, **kw):
  if method in ("percentile", "entropy", "mse"):
    kw.setdefault("num_bins", NUM_BINS)
  return jqat.init_stats(shape, cfg, method, **kw)


def _assert_same(a, b):
  """Bit-identical PyTrees."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------------------------------------------------------------
# Range states.


@pytest.mark.parametrize(
  "granularity",
  [
    {},
    {"per_channel": True},
    {"per_channel": True, "channel_axis": 0},
    {"group_size": 4},
    {"per_channel": True, "group_size": 2},
  ],
)
def test_range_matches_array_range(ref, granularity):
  cfg = jqat.QatConfig(**granularity)
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  s = _update(_init(x.shape, cfg, "minmax"), x)
  lo, hi = ref.array_range(x, **granularity)
  np.testing.assert_array_equal(s.min, lo)
  np.testing.assert_array_equal(s.max, hi)
  qp = _finalize(s, cfg, "minmax")
  scale, zp = ref.qparams(lo, hi, "int8", True)
  np.testing.assert_array_equal(qp.scale, scale)
  np.testing.assert_array_equal(qp.zero_point, zp)
  assert int(s.count) == x.size


def test_per_tensor_state_accepts_any_batch_shape():
  cfg = jqat.QatConfig()
  s = _init((2, 3), cfg, "minmax")
  s = jqat.update_stats(s, jnp.arange(5.0))
  s = jqat.update_stats(s, -jnp.ones((4, 1, 2)))
  assert float(s.min.reshape(())) == -1.0 and float(s.max.reshape(())) == 4.0


def test_per_channel_shape_mismatch_raises():
  s = _init((4, 3), jqat.QatConfig(per_channel=True), "minmax")
  with pytest.raises(ValueError, match="does not match statistics of shape"):
    jqat.update_stats(s, jnp.ones((4, 5)))


def test_moving_average():
  cfg = jqat.QatConfig(symmetric=False)
  s = _init((4,), cfg, "moving_average", momentum=0.75)
  s = _update(s, jnp.array([-1.0, 2.0, 0.0, 1.0]))  # the first batch sets the range
  assert float(s.min) == -1.0 and float(s.max) == 2.0
  s = _update(s, jnp.array([-3.0, 6.0, 0.0, 1.0]))
  assert float(s.min) == 0.75 * -1 + 0.25 * -3 and float(s.max) == 0.75 * 2 + 0.25 * 6
  s2 = _update(s, jnp.full((4,), jnp.nan))  # a batch with nothing finite leaves the average alone
  np.testing.assert_array_equal(s2.min, s.min)
  assert int(s2.nonfinite) == 4
  m = jqat.merge_stats(s, s)  # replicas keep their range; the counts add up
  _assert_same((m.min, m.max, m.momentum), (s.min, s.max, s.momentum))
  assert int(m.count) == 2 * int(s.count)
  qp = _finalize(s, cfg, "moving_average")
  _assert_same(qp, jqat.qparams_from_range(s.min, s.max, cfg))
  _assert_same(_finalize(s, cfg, "minmax"), qp)
  with pytest.raises(ValueError, match="momentum"):
    _init((4,), cfg, "moving_average", momentum=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Exact, associative merge (hypothesis): any order, any split, bit-identical.

_values = st.lists(
  st.one_of(
    st.floats(-1e3, 1e3, width=32),
    st.floats(float(np.float32(-1e-30)), float(np.float32(1e-30)), width=32),
    st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 3e38, -2.5e-44]),
  ),
  min_size=128,
  max_size=128,
)


@settings(max_examples=10)
@given(
  values=_values,
  perm_seed=st.integers(0, 2**16),
  groups=st.lists(st.integers(1, 7), max_size=3, unique=True),
  method=st.sampled_from(["minmax", "entropy"]),
)
def test_merge_is_exact_for_any_split_and_order(values, perm_seed, groups, method):
  cfg = jqat.QatConfig()
  x = np.asarray(values, np.float32)
  one_pass = _update(_init(x.shape, cfg, method), x)
  # Eight batches of 16 (one compiled shape), taken in a random order.
  batches = [x[16 * k : 16 * (k + 1)] for k in np.random.default_rng(perm_seed).permutation(8)]
  seq = _init(x.shape, cfg, method)
  for p in batches:
    seq = _update(seq, p)
  _assert_same(seq, one_pass)
  # Runs of consecutive batches observed separately, then merged right to left.
  runs = np.split(np.arange(8), sorted(groups))
  states = []
  for run in runs:
    s = _init(x.shape, cfg, method)
    for k in run:
      s = _update(s, batches[k])
    states.append(s)
  acc = states[-1]
  for s in states[-2::-1]:
    acc = _merge(s, acc)
  _assert_same(acc, one_pass)
  if method == "entropy":
    for m in ("entropy", "percentile", "mse", "minmax"):
      _assert_same(_finalize(acc, cfg, m), _finalize(one_pass, cfg, m))


def test_histogram_widening_is_exact():
  cfg = jqat.QatConfig()
  small = jnp.linspace(0.0, 0.01, 64)
  big = jnp.linspace(-300.0, 300.0, 64)
  a = _update(_update(_init((64,), cfg, "entropy"), small), big)
  b = _update(_update(_init((64,), cfg, "entropy"), big), small)
  c = _update(_init((128,), cfg, "entropy"), jnp.concatenate([big, small]))
  _assert_same(a, b)
  _assert_same(a, c)
  assert int(a.exponent) == 9  # 300 < 2^9
  assert int(a.counts.sum()) == 128


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_all_reduce_matches_merge(method):
  cfg = jqat.QatConfig()
  xs = jnp.asarray(np.random.default_rng(1).laplace(size=(4, 64)) * np.array([[1], [10], [0.1], [3]]), jnp.float32)
  per_device = jax.vmap(lambda x: jqat.update_stats(_init((64,), cfg, method), x))(xs)
  reduced = jax.vmap(lambda s: jqat.all_reduce_stats(s, "d"), axis_name="d")(per_device)
  merged = _init((64,), cfg, method)
  for k in range(4):
    merged = _merge(merged, jax.tree.map(lambda v, k=k: v[k], per_device))
  _assert_same(jax.tree.map(lambda v: v[2], reduced), merged)


# ---------------------------------------------------------------------------------------------------------------------
# Bad data.


@pytest.mark.parametrize("method", ["minmax", "moving_average", "entropy"])
def test_nonfinite_values_are_skipped_and_counted(method):
  cfg = jqat.QatConfig()
  x = jnp.array([1.0, jnp.nan, -2.0, jnp.inf, -jnp.inf, 0.5])
  s = _update(_init(x.shape, cfg, method), x)
  clean = _update(_init(x.shape, cfg, method), jnp.array([1.0, -2.0, 0.5]))
  assert int(s.nonfinite) == 3 and int(s.count) == 3
  assert jqat.nonfinite_count({"a": s, "b": [clean]}) == {"a": 3, "b": [0]}
  finalize_method = "entropy" if method == "entropy" else method
  _assert_same(_finalize(s, cfg, finalize_method), _finalize(clean, cfg, finalize_method))


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "entropy", "mse"])
@pytest.mark.parametrize("data", ["zeros", "constant", "all_nan", "nothing"])
def test_degenerate_data_gives_a_positive_scale(method, data):
  cfg = jqat.QatConfig()
  s = _init((16,), cfg, method)
  if data != "nothing":
    s = _update(s, {"zeros": jnp.zeros(16), "constant": jnp.full(16, 3.0), "all_nan": jnp.full(16, jnp.nan)}[data])
  qp = _finalize(s, cfg, method)
  scale = np.asarray(qp.scale)
  assert np.all(np.isfinite(scale)) and np.all(scale > 0)
  if data == "constant" and method in ("percentile", "mse"):
    # The left edge (percentile) or centre (MSE) of the top bin of 2048, as in the reference.
    np.testing.assert_allclose(scale, 3.0 / 127, rtol=1 / 2048)
  elif data == "constant":
    np.testing.assert_allclose(scale, 3.0 / 127, rtol=1e-6)  # the single value is kept exactly
  else:
    assert np.all(scale == jqat.MIN_SCALE)


def test_empty_input_and_bad_combinations_raise():
  cfg = jqat.QatConfig()
  for method in ("minmax", "moving_average", "entropy"):
    with pytest.raises(ValueError, match="empty"):
      jqat.update_stats(_init((3,), cfg, method), jnp.zeros((0, 3)))
  with pytest.raises(ValueError, match="per-tensor only"):
    jqat.init_stats((4, 3), jqat.QatConfig(per_channel=True), "entropy")
  with pytest.raises(ValueError, match="supports"):
    jqat.finalize_stats(_init((3,), cfg, "minmax"), cfg, "entropy")
  with pytest.raises(ValueError, match="method='median' is invalid"):
    jqat.init_stats((3,), cfg, "median")
  with pytest.raises(TypeError, match="cannot merge"):
    jqat.merge_stats(_init((3,), cfg, "minmax"), _init((3,), cfg, "entropy"))
  with pytest.raises(ValueError, match="no batches"):
    jqat.calibrate_model({"a": []})
  with pytest.raises(ValueError, match="empty batch"):
    jqat.calibrate_model({"a": [jnp.zeros((0,))]})


# ---------------------------------------------------------------------------------------------------------------------
# Methods and configs.


def test_asymmetric_relu_and_fp8():
  x = jnp.maximum(jnp.asarray(np.random.default_rng(2).normal(size=4096), jnp.float32), 0)
  acfg = jqat.QatConfig(symmetric=False)
  s = _update(_init(x.shape, acfg, "percentile"), x)
  qp = _finalize(s, acfg, "percentile", percentile=99.0)
  assert float(qp.zero_point) == -128  # non-negative data: [0, amax] over the whole grid
  amax = float(qp.scale) * 255
  assert 0 < amax < float(x.max())
  fcfg = jqat.QatConfig(bits="fp8_e4m3")
  qf = _finalize(s, fcfg, "mse")  # the search on the fp8 grid
  assert 0 < float(qf.scale) * 448 <= float(x.max()) * (1 + 1e-6)  # amax maps to the format max
  qm = _finalize(s, fcfg, "minmax")
  assert float(qm.scale) == np.float32(x.max()) / np.float32(448)


def test_bf16_input_and_no_recompile():
  cfg = jqat.QatConfig()
  traces = []

  @jax.jit
  def step(s, x):
    traces.append(1)
    return jqat.update_stats(s, x)

  s = _init((8,), cfg, "entropy")
  for k in range(3):
    s = step(s, jnp.arange(8, dtype=jnp.bfloat16) * (k + 1))
  assert len(traces) == 1
  assert float(s.max) == 21.0 and int(s.count) == 24


# ---------------------------------------------------------------------------------------------------------------------
# PyTree level.


def test_tree_observe_merge_finalize():
  cfg = jqat.QatConfig()
  acts = {"dense": jnp.arange(6.0).reshape(2, 3), "conv": [jnp.ones((2, 2)), -jnp.ones(3)]}
  st0 = jqat.init_tree(acts, cfg, "minmax")
  st1 = jax.jit(jqat.observe)(st0, acts)
  st2 = jqat.merge(st1, jqat.observe(st0, jax.tree.map(lambda a: 2 * a, acts)))
  qps = jqat.finalize(st2, cfg, "minmax")
  assert float(qps["dense"].scale.reshape(())) == np.float32(10.0) / np.float32(127)
  assert float(qps["conv"][1].scale.reshape(())) == np.float32(2.0) / np.float32(127)
  with pytest.raises(ValueError, match="different structures") as err:
    jqat.observe(st0, {"dense": acts["dense"]})
  assert "statistics" in str(err.value) and "activations" in str(err.value) and "conv" in str(err.value)
  with pytest.raises(ValueError, match="different structures"):
    jqat.merge(st0, {"dense": st0["dense"]})


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_calibrate_model(method):
  rng = np.random.default_rng(5)
  cfg = jqat.QatConfig()
  batches = {"fc1": [rng.normal(size=(64, 16)).astype(np.float32) for _ in range(2)], "fc2": [np.ones((8, 4))]}
  kw = {"num_bins": NUM_BINS} if method in ("percentile", "entropy", "mse") else {}
  specs = jqat.calibrate_model(batches, method=method, config=cfg, **kw)
  assert set(specs) == {"fc1", "fc2"}
  spec = specs["fc1"]
  assert isinstance(spec, jqat.QuantizationSpec) and spec.layer_name == "fc1"
  assert spec.method == jqat.CalibMethod(method)
  # Per tensor: a scalar, the shape qparams_from_range and finalize_stats give too.
  assert spec.scale.shape == () and spec.zero_point.shape == ()
  amax = float(np.abs(np.concatenate(batches["fc1"])).max())
  assert 0 < float(spec.scale) * 127 <= amax * (1 + 1e-6)
  # Percentile takes the left edge and MSE the centre of the top bin: within 1/2048 of the constant.
  np.testing.assert_allclose(specs["fc2"].scale, 1 / 127, rtol=1 / 2048)


def test_calibrate_model_per_channel_and_kl_alias():
  x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
  specs = jqat.calibrate_model({"w": [x]}, method="minmax", config=jqat.QatConfig(per_channel=True))
  # jqat evaluates amax / 127 as amax * (1 / 127) (see jqat.qparams_from_range).
  np.testing.assert_array_equal(specs["w"].scale, x.max(axis=0, keepdims=True) * np.float32(1 / 127))
  kl = jqat.calibrate_model({"a": [x]}, method="kl", config=jqat.QatConfig(), num_bins=NUM_BINS)
  assert kl["a"].method is jqat.CalibMethod.ENTROPY


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
@pytest.mark.parametrize("value", [3.0, -3.0])
def test_constant_data_under_an_asymmetric_config(method, value):
  # The histogram threshold is a bin edge at or just below |value|: the observed range [value, value] is clipped
  # to it at both ends, so the range stays ordered and, widened to include 0, spans [0, ~3] or [~-3, 0].
  cfg = jqat.QatConfig(symmetric=False)
  s = _update(_init((16,), cfg, method), jnp.full(16, value))
  qp = _finalize(s, cfg, method)
  np.testing.assert_allclose(float(qp.scale), 3.0 / 255, rtol=1 / 2048)  # within one bin of 2048
  assert float(qp.zero_point) == (-128.0 if value > 0 else 127.0)
