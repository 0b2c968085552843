"""jqat.Rule: validation, first match wins, ops filter, unmatched rules are an error."""

import pytest

import jqat
from jqat._src import rules as rules_lib


def test_first_matching_rule_wins():
  rules = (jqat.Rule(".*lm_head.*"), jqat.Rule(".*", weight=jqat.QatConfig(bits="int4", per_channel=True)))
  assert rules_lib.match(rules, "decoder/lm_head", "dot") == 0
  assert rules_lib.match(rules, "decoder/layer_0/mlp", "dot") == 1
  assert rules[0].is_float and not rules[1].is_float


def test_pattern_is_full_matched():
  rules = (jqat.Rule("layer_0", weight=jqat.QatConfig()),)
  assert rules_lib.match(rules, "layer_0", "dot") == 0
  assert rules_lib.match(rules, "layer_0/mlp", "dot") is None
  assert rules_lib.match(rules, "x/layer_0", "dot") is None


def test_ops_filter_and_default_rules():
  d = rules_lib.DEFAULT_RULES
  assert d[rules_lib.match(d, "embed", "embed")].activation is None  # embeddings are weight-only by default
  assert d[rules_lib.match(d, "embed", "attend")].activation is None
  dense = d[rules_lib.match(d, "mlp/fc1", "dot")]
  assert dense.weight.per_channel and dense.activation is not None and not dense.activation.symmetric


@pytest.mark.parametrize(
  "kwargs,err,msg",
  [
    (dict(pattern="("), ValueError, "not a valid regular expression"),
    (dict(pattern=3), TypeError, "must be a str"),
    (dict(pattern=".*", weight="int8"), TypeError, "Rule.weight must be a jqat.QatConfig"),
    (dict(pattern=".*", ops=("matmul",)), ValueError, "Rule.ops="),
  ],
)
def test_bad_rules_raise(kwargs, err, msg):
  with pytest.raises(err, match=msg):
    jqat.Rule(**kwargs)


def test_unmatched_rule_raises_listing_paths():
  rules = (jqat.Rule(".*lm_head.*"), jqat.Rule(".*", weight=jqat.QatConfig()))
  with pytest.raises(ValueError, match=r"'\.\*lm_head\.\*'.*'block/dense'"):
    rules_lib.check_all_matched(rules, matched=[1], paths=["block/dense"])
  rules_lib.check_all_matched(rules, matched=[0, 1], paths=["lm_head", "block/dense"])
  rules_lib.check_all_matched(rules_lib.DEFAULT_RULES, matched=[], paths=[])


def test_normalize_rules():
  assert rules_lib.normalize_rules(None) == rules_lib.DEFAULT_RULES
  with pytest.raises(ValueError, match="rules is empty"):
    rules_lib.normalize_rules([])
  with pytest.raises(TypeError, match="jqat.Rule"):
    rules_lib.normalize_rules([".*"])
