"""``Rule``: which ops of a model are quantized, and how.

A rule pairs a regular expression over module paths with the configs of the
weight and of the activation. ``quantize_model`` (linen and NNX) asks, for
each matmul-like op, which rule its path full-matches; the first one wins.
A rule with ``weight=None`` and ``activation=None`` keeps the op float. Rules
that match nothing are an error, listing the paths that exist: a rule that
silently stops matching after a model refactor is how a layer ends up float
without anyone noticing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from jqat._src.config import QatConfig

# The kinds of op a rule can match. "dot": a dense projection (Dense,
# DenseGeneral, Linear, attention projections, a module's own dot_general /
# matmul of a parameter); "einsum": an einsum with a parameter; "conv": a
# convolution; "embed": an embedding lookup; "attend": the tied logits of an
# embedding (``x @ table.T``).
OP_KINDS = ("dot", "einsum", "conv", "embed", "attend")

# jqat's defaults: weights int8 symmetric per output channel, activations int8
# asymmetric per tensor; embeddings weight-only, one scale per row of the
# table (the row is both the looked-up vector and the tied logit's channel).
DEFAULT_WEIGHT = QatConfig(bits="int8", per_channel=True, symmetric=True)
DEFAULT_ACTIVATION = QatConfig(bits="int8", per_channel=False, symmetric=False)
DEFAULT_EMBEDDING = QatConfig(bits="int8", per_channel=True, symmetric=True)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantize the ops whose module path full-matches ``pattern``.

  Attributes:
    pattern: a regular expression, full-matched against the module path with
      ``/`` between names (``"encoder/layer_0/attention/query"``).
    weight: the weight's config, or None to leave the weight float.
    activation: the activation's (input's) config, or None to leave it float
      (weight-only). Embedding lookups have no activation operand and ignore it.
    ops: restricts the rule to these op kinds (see ``OP_KINDS``); None for all.

  Examples:
    >>> import jqat
    >>> rules = [jqat.Rule(".*lm_head.*"), jqat.Rule(".*", weight=jqat.QatConfig(bits="int4", per_channel=True))]
    >>> rules[0].is_float, rules[1].weight.bits.value
    (True, 'int4')
    >>> jqat.Rule("(", weight=None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Rule.pattern='(' is not a valid regular expression: ...
  """

  pattern: str
  weight: QatConfig | None = dataclasses.field(default=None, kw_only=True)
  activation: QatConfig | None = dataclasses.field(default=None, kw_only=True)
  ops: tuple[str, ...] | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    if not isinstance(self.pattern, str):
      raise TypeError(f"Rule.pattern must be a str (a regular expression), got {type(self.pattern).__name__}")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"Rule.pattern={self.pattern!r} is not a valid regular expression: {e}") from None
    for name in ("weight", "activation"):
      v = getattr(self, name)
      if v is not None and not isinstance(v, QatConfig):
        raise TypeError(f"Rule.{name} must be a jqat.QatConfig or None, got {v!r}")
    if self.ops is not None:
      ops = (self.ops,) if isinstance(self.ops, str) else tuple(self.ops)
      bad = [o for o in ops if o not in OP_KINDS]
      if bad or not ops:
        raise ValueError(f"Rule.ops={self.ops!r} is invalid; allowed: None or a tuple of {', '.join(OP_KINDS)}")
      object.__setattr__(self, "ops", ops)

  @property
  def is_float(self) -> bool:
    """True when the rule keeps its ops float."""
    return self.weight is None and self.activation is None

  def matches(self, path: str, op: str) -> bool:
    if self.ops is not None and op not in self.ops:
      return False
    return re.fullmatch(self.pattern, path) is not None


DEFAULT_RULES = (
  Rule(".*", ops=("embed", "attend"), weight=DEFAULT_EMBEDDING, activation=None),
  Rule(".*", weight=DEFAULT_WEIGHT, activation=DEFAULT_ACTIVATION),
)


def normalize_rules(rules: Sequence[Rule] | None) -> tuple[Rule, ...]:
  """``rules`` as a tuple, checked; None gives ``DEFAULT_RULES``."""
  if rules is None:
    return DEFAULT_RULES
  if isinstance(rules, Rule):
    rules = (rules,)
  rules = tuple(rules)
  bad = [r for r in rules if not isinstance(r, Rule)]
  if bad:
    raise TypeError(f"rules must be jqat.Rule objects, got {bad[0]!r}")
  if not rules:
    raise ValueError("rules is empty; pass None for jqat's default rules, or at least one jqat.Rule")
  return rules


def match(rules: Sequence[Rule], path: str, op: str) -> int | None:
  """Index of the first rule that matches ``(path, op)``, or None.

  Examples:
    >>> import jqat
    >>> rules = (jqat.Rule(".*head"), jqat.Rule("block_.*", weight=jqat.QatConfig()))
    >>> match(rules, "lm_head", "dot"), match(rules, "block_0/mlp", "dot"), match(rules, "embed", "embed")
    (0, 1, None)
  """
  if op not in OP_KINDS:
    raise ValueError(f"op={op!r} is invalid; allowed: {', '.join(OP_KINDS)}")
  for i, r in enumerate(rules):
    if r.matches(path, op):
      return i
  return None


def check_all_matched(rules: Sequence[Rule], matched: Iterable[int], paths: Iterable[str]) -> None:
  """Raises when a rule matched no op, listing the op paths the model has.

  ``DEFAULT_RULES`` are exempt (a model without embeddings is fine).
  """
  if tuple(rules) == DEFAULT_RULES:
    return
  matched = set(matched)
  unused = [r for i, r in enumerate(rules) if i not in matched]
  if unused:
    listing = ", ".join(repr(p) for p in sorted(set(paths))) or "(none)"
    names = ", ".join(repr(r.pattern) + (f" (ops {r.ops})" if r.ops else "") for r in unused)
    raise ValueError(
      f"these rules matched no op of the model: {names}. The model's quantizable ops are at: {listing}. "
      "Patterns are full-matched against the path (use '.*' for a prefix or suffix)."
    )
