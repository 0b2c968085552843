"""Tests for jqat._src.config: QatConfig construction, normalization, hashing and validation."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest

import jqat
from jqat._src.config import CalibMethod, Estimator, QatConfig
from jqat._src.formats import QuantBits


def test_defaults():
  cfg = QatConfig()
  assert cfg.bits is QuantBits.INT8
  assert cfg.per_channel is False
  assert cfg.symmetric is True
  assert cfg.channel_axis == -1
  assert cfg.group_size is None
  assert cfg.group_axis == 0
  assert cfg.narrow_range is False
  assert cfg.estimator is Estimator.STE
  assert (cfg.qmin, cfg.qmax) == (-128, 127)


def test_fields_are_keyword_only():
  with pytest.raises(TypeError):
    QatConfig("int8")


def test_strings_are_normalized_to_enums():
  cfg = QatConfig(bits="fp8", estimator="lsq")
  assert cfg.bits is QuantBits.FP8_E4M3
  assert cfg.estimator is Estimator.LSQ
  assert QatConfig(bits="int4") == QatConfig(bits=QuantBits.INT4)
  assert hash(QatConfig(bits="int4")) == hash(QatConfig(bits=QuantBits.INT4))


def test_channel_axis_normalization():
  assert QatConfig(channel_axis=(1,)).channel_axis == 1
  assert QatConfig(channel_axis=2).channel_axes == (2,)
  assert QatConfig(channel_axis=(0, 2)).channel_axes == (0, 2)


@pytest.mark.parametrize(
  ("kwargs", "qmin", "qmax"),
  [
    (dict(bits="int8"), -128, 127),
    (dict(bits="int8", narrow_range=True), -127, 127),
    (dict(bits="int4"), -8, 7),
    (dict(bits="int4", narrow_range=True), -7, 7),
    (dict(bits="int2"), -2, 1),
    (dict(bits="int3", narrow_range=True), -3, 3),
    (dict(bits="fp8_e4m3"), -448.0, 448.0),
    (dict(bits="fp8_e5m2"), -57344.0, 57344.0),
  ],
)
def test_qmin_qmax(kwargs, qmin, qmax):
  cfg = QatConfig(**kwargs)
  assert (cfg.qmin, cfg.qmax) == (qmin, qmax)


def test_frozen_and_hashable():
  cfg = QatConfig(bits="int4", per_channel=True, channel_axis=(0, 1))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.bits = "int8"  # type: ignore[misc]
  table = {cfg: 1, QatConfig(): 2}
  assert table[QatConfig(bits="int4", per_channel=True, channel_axis=(0, 1))] == 1
  assert QatConfig(bits="int4") != QatConfig(bits="int8")


def test_usable_as_static_jit_argument():
  traces = []

  @jax.jit
  def f(x):
    return x

  def g(x, cfg):
    traces.append(cfg)
    return f(x) * cfg.qmax

  gj = jax.jit(g, static_argnums=1)
  assert float(gj(jnp.float32(1.0), QatConfig(bits="int4"))) == 7.0
  assert float(gj(jnp.float32(2.0), QatConfig(bits="int4"))) == 14.0
  assert len(traces) == 1  # an equal config hits the cache


def test_replace_revalidates():
  cfg = QatConfig(bits="int4")
  assert cfg.replace(bits="int8").bits is QuantBits.INT8
  assert cfg.replace(bits="int8").qmax == 127
  with pytest.raises(ValueError, match="bits"):
    cfg.replace(bits="int9")
  with pytest.raises(ValueError, match="symmetric"):
    QatConfig(bits="fp8").replace(symmetric=False)


# Every invalid field: the message must name the field and repeat the value.
INVALID = [
  (dict(bits="int9"), "bits", "'int9'"),
  (dict(bits="int1"), "bits", "'int1'"),
  (dict(bits=8), "bits", "8"),
  (dict(per_channel="yes"), "per_channel", "'yes'"),
  (dict(symmetric=1), "symmetric", "1"),
  (dict(narrow_range=None), "narrow_range", "None"),
  (dict(channel_axis=(0, 0)), "channel_axis", "(0, 0)"),
  (dict(channel_axis=()), "channel_axis", "()"),
  (dict(channel_axis=1.5), "channel_axis", "1.5"),
  (dict(channel_axis=[0, 1]), "channel_axis", "[0, 1]"),
  (dict(channel_axis=True), "channel_axis", "True"),
  (dict(group_size=0), "group_size", "0"),
  (dict(group_size=-4), "group_size", "-4"),
  (dict(group_size=2.0), "group_size", "2.0"),
  (dict(group_axis="0"), "group_axis", "'0'"),
  (dict(per_channel=True, channel_axis=0, group_size=4, group_axis=0), "group_axis", "0"),
  (dict(per_channel=True, channel_axis=(0, 1), group_size=4, group_axis=1), "group_axis", "1"),
  (dict(bits="fp8_e4m3", symmetric=False), "symmetric", "False"),
  (dict(bits="fp8_e5m2", symmetric=False), "symmetric", "False"),
  (dict(bits="fp8_e4m3", narrow_range=True), "narrow_range", "True"),
  (dict(estimator="foo"), "estimator", "'foo'"),
]


@pytest.mark.parametrize(("kwargs", "field", "value"), INVALID, ids=[f"{f}={v}" for _, f, v in INVALID])
def test_invalid_config_names_field_and_value(kwargs, field, value):
  with pytest.raises(ValueError) as info:
    QatConfig(**kwargs)
  msg = str(info.value)
  assert f"QatConfig.{field}={value}" in msg
  assert "allowed" in msg


def test_invalid_bits_lists_allowed_values():
  with pytest.raises(ValueError) as info:
    QatConfig(bits="int9")
  for name in ("int2", "int8", "fp8_e4m3", "fp8_e5m2"):
    assert repr(name) in str(info.value)


def test_invalid_estimator_lists_allowed_values():
  with pytest.raises(ValueError, match=re.escape("'ste', 'lsq'")):
    QatConfig(estimator="foo")


def test_group_axis_may_equal_channel_axis_without_per_channel():
  # channel_axis is ignored unless per_channel, so it cannot clash with the group axis.
  cfg = QatConfig(per_channel=False, channel_axis=0, group_size=4, group_axis=0)
  assert cfg.group_size == 4


def test_calib_method():
  assert CalibMethod.KL is CalibMethod.ENTROPY
  assert CalibMethod("kl") is CalibMethod.ENTROPY
  assert CalibMethod("KL") is CalibMethod.ENTROPY
  assert CalibMethod("moving-average") is CalibMethod.MOVING_AVERAGE
  assert {m.value for m in (CalibMethod.MINMAX, CalibMethod.PERCENTILE, CalibMethod.MSE)} == {
    "minmax",
    "percentile",
    "mse",
  }
  with pytest.raises(ValueError):
    CalibMethod("median")


def test_public_names_are_the_same_objects():
  assert jqat.QatConfig is QatConfig
  assert jqat.QuantBits is QuantBits
  assert jqat.Estimator is Estimator
  assert jqat.CalibMethod is CalibMethod


def test_rounding_scale_rule_and_scale_dtype_defaults_and_normalization():
  from jqat._src.config import Rounding, ScaleRule

  cfg = QatConfig()
  assert (cfg.rounding, cfg.scale_rule, cfg.scale_dtype, cfg.signed_scale) == (
    Rounding.HALF_EVEN,
    ScaleRule.AMAX,
    None,
    False,
  )
  cfg = QatConfig(bits="int4", rounding="half_up_unsigned", scale_rule="signed_max", scale_dtype=jnp.float16)
  assert cfg.rounding is Rounding.HALF_UP_UNSIGNED and cfg.scale_rule is ScaleRule.SIGNED_MAX
  assert cfg.scale_dtype == "float16" and cfg.signed_scale
  same = QatConfig(bits="int4", rounding=Rounding.HALF_UP_UNSIGNED, scale_rule="signed_max", scale_dtype="float16")
  assert cfg == same and hash(cfg) == hash(same)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.scale_dtype = "float32"


@pytest.mark.parametrize(
  ("kwargs", "message"),
  [
    (dict(rounding="nearest"), "QatConfig.rounding='nearest' is invalid; allowed: 'half_even', 'half_away_from_zero'"),
    (dict(scale_rule="max"), "QatConfig.scale_rule='max' is invalid; allowed: 'amax', 'amax_exact', 'signed_max'"),
    (dict(scale_dtype="int8"), "QatConfig.scale_dtype='int8' is invalid; allowed: None, 'float32', 'float16'"),
    (dict(scale_dtype="float64"), "QatConfig.scale_dtype='float64' is invalid"),
    (dict(bits="fp8", rounding="half_away_from_zero"), "allowed: 'half_even' for the float format 'fp8_e4m3'"),
    (dict(bits="fp8", scale_rule="amax_exact"), "allowed: 'amax' for the float format 'fp8_e4m3'"),
    (dict(symmetric=False, scale_rule="signed_max"), "allowed: 'amax' for an asymmetric config"),
    (dict(scale_rule="signed_max", narrow_range=True), "QatConfig.narrow_range=True is invalid; allowed: False with"),
    (dict(scale_rule="signed_max", estimator="lsq"), "QatConfig.estimator='lsq' is invalid; allowed: 'ste' with"),
  ],
)
def test_rounding_scale_rule_and_scale_dtype_validation(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    QatConfig(**kwargs)
