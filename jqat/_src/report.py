"""The report of ``quantize_model``: one row per matmul-like op, what matched and what it costs.

Shared by linen and NNX so that both print the same table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from jqat._src.config import QatConfig
from jqat._src.qparams import params_shape


class OpReport(NamedTuple):
  """One matmul-like op of a model.

  Attributes:
    path: the module path (``"decoder/layer_0/mlp/fc1"``).
    op: the op kind, one of ``jqat._src.rules.OP_KINDS``.
    lhs_shape: shape of the activation operand (the ids for an embedding lookup).
    rhs_shape: shape of the weight.
    rule: the pattern of the rule that matched, or None when none did.
    weight: the weight's format in words (``describe``), ``"float"`` when not quantized.
    activation: the activation's format in words, ``"float"`` when not quantized.
    float_bytes: bytes of the float weight.
    serving_bytes: bytes of the weight as served (values, scales, sums), equal
      to ``float_bytes`` for a float op.
  """

  path: str
  op: str
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  rule: str | None
  weight: str
  activation: str
  float_bytes: int
  serving_bytes: int


def describe(config: QatConfig | None) -> str:
  """A config in a few words: ``"int8 sym per-channel"``, ``"int4 sym g128"``, ``"float"``.

  Examples:
    >>> import jqat
    >>> describe(jqat.QatConfig(bits="int4", per_channel=True, group_size=128))
    'int4 sym per-channel g128'
    >>> describe(None)
    'float'
  """
  if config is None:
    return "float"
  parts = [config.bits.value, "sym" if config.symmetric else "asym"]
  parts.append("per-channel" if config.per_channel else "per-tensor" if config.group_size is None else "")
  if config.group_size is not None:
    parts.append(f"g{config.group_size}")
  if config.estimator.value != "ste":
    parts.append(config.estimator.value)
  return " ".join(p for p in parts if p)


def weight_serving_bytes(shape: Sequence[int], config: QatConfig | None, float_itemsize: int = 4) -> int:
  """Bytes of a weight of ``shape`` served with ``config``: values plus float32 scales and zero points.

  Sums for an asymmetric activation are not counted (``convert`` reports them).

  Examples:
    >>> import jqat
    >>> weight_serving_bytes((1024, 256), jqat.QatConfig(per_channel=True))  # int8 values + 256 scales and zeros
    264192
  """
  n = math.prod(shape)
  if config is None:
    return n * float_itemsize
  bits = config.bits
  if bits.is_packed:
    rows = shape[0] if shape else 1
    values = (rows + 1) // 2 * (n // max(rows, 1))
  else:
    values = n
  scales = math.prod(params_shape(tuple(shape), config)) if shape else 1
  return values + 2 * 4 * scales


def format_table(rows: Sequence[OpReport]) -> str:
  """The rows as a plain-text table with a total line.

  Examples:
    >>> r = OpReport("mlp/fc1", "dot", (8, 64), (64, 32), ".*", "int8 sym per-channel", "int8 asym per-tensor",
    ...              8192, 2304)
    >>> print(format_table([r]).splitlines()[-1].split())
    ['total', '8,192', '2,304', '(0.281x)']
  """
  header = ("path", "op", "activation", "weight", "rule", "weight format", "activation format", "float B", "served B")
  body = [
    (
      r.path,
      r.op,
      "x".join(map(str, r.lhs_shape)),
      "x".join(map(str, r.rhs_shape)),
      "-" if r.rule is None else r.rule,
      r.weight,
      r.activation,
      f"{r.float_bytes:,}",
      f"{r.serving_bytes:,}",
    )
    for r in rows
  ]
  total_f = sum(r.float_bytes for r in rows)
  total_s = sum(r.serving_bytes for r in rows)
  ratio = f"({total_s / total_f:.3f}x)" if total_f else ""
  body.append(("total", "", "", "", "", "", "", f"{total_f:,}", f"{total_s:,} {ratio}".strip()))
  widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
  lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *body]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)

