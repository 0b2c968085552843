"""Flax NNX einsum and embedding layers: ``QatEinsumOp``, ``QatEinsum`` and ``QatEmbed``.

``QatEinsumOp`` is callable like ``jnp.einsum`` (``nnx.Einsum``'s
``einsum_op``): the einsum of an activation with a kernel runs as one
quantized ``dot_general`` (the activation always as lhs, whatever the
equation, ``...`` allowed) and a transpose back to the equation's order; the
kernel's per-channel axes are its non-contracting axes. It never calls
``jnp.einsum``, whose internal ``jit`` is what makes a naive ``einsum_op``
fail with "Cannot mutate QuantStat from a different trace level".

``QatEmbed`` keeps one table, quantized per row (int8 by default), for both the
lookup and ``attend`` (tied logits); after ``convert`` it stores only that
quantized table.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jqat._src import qtensor as qtensor_lib
from jqat._src.config import QatConfig
from jqat._src.einsum import parse_einsum
from jqat._src.fake_quant import fake_quant
from jqat._src.flax import common
from jqat._src.flax import nnx as qnnx
from jqat._src.rules import DEFAULT_EMBEDDING


def _terms(equation: str, where: str) -> tuple[str, str, str | None]:
  eq = equation.replace(" ", "")
  ins, out = eq.split("->") if "->" in eq else (eq, None)
  terms = ins.split(",")
  if len(terms) != 2:
    raise ValueError(f"{where}: einsum {equation!r} needs exactly two operands (activation, kernel).")
  return terms[0], terms[1], out


def _kernel_dims(equation: str, kernel_ndim: int, where: str):
  """``parse_einsum`` of ``equation`` for a kernel of ``kernel_ndim`` axes, without knowing the activation's rank.

  The kernel's contracting and batch axes do not depend on how many axes an
  activation's ``...`` covers, as long as it covers the kernel's own ``...``.
  """
  x, w, _ = _terms(equation, where)
  n_w = kernel_ndim - len(w.replace("...", "")) if "..." in w else 0
  lhs_ndim = len(x.replace("...", "")) + (n_w if "..." in x else 0)
  return parse_einsum(equation, lhs_ndim, kernel_ndim)


def _permuted_sharding(out_sharding, perm):
  """The sharding of the ``dot_general`` output whose transpose by ``perm`` has ``out_sharding``."""
  if out_sharding is None:
    return None
  spec = out_sharding.spec if isinstance(out_sharding, NamedSharding) else out_sharding
  if not isinstance(spec, PartitionSpec):
    return out_sharding
  entries = tuple(spec) + (None,) * (len(perm) - len(spec))
  dot_spec = [None] * len(perm)
  for i, j in enumerate(perm):
    dot_spec[j] = entries[i]
  return PartitionSpec(*dot_spec)


class QatEinsumOp(qnnx.QatDotGeneral):
  """A quantization-aware ``jnp.einsum(equation, activation, kernel)``, for ``nnx.Einsum(einsum_op=...)``.

  Args:
    lhs_config: activation config (default int8 asymmetric per-tensor), None,
      or a format name.
    rhs_config: kernel config (default int8 symmetric, per channel on the
      kernel's non-contracting axes), None, or a format name.
    mode: ``"qat"``, ``"calibrate"`` or ``"float"``.
    momentum: of the activation-range moving average.
    use_running_average: when True, statistics are used but not updated.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> layer = nnx.Einsum("btd,dnh->btnh", (4, 2, 3), einsum_op=jqat.nnx.QatEinsumOp(), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 5, 4))).shape
    (1, 5, 2, 3)
  """

  def __call__(
    self, equation, lhs, rhs, *, precision=None, preferred_element_type=None, out_sharding=None, optimize=None
  ):
    del optimize  # one contraction: there is no order to optimize
    where = self._where()
    if not isinstance(equation, str):
      raise TypeError(f"{where}: the einsum equation must be a str, got {equation!r}.")
    rhs_shape = tuple(rhs.shape) if hasattr(rhs, "shape") else jnp.shape(rhs)
    try:
      dims = parse_einsum(equation, jnp.ndim(lhs), len(rhs_shape))
    except ValueError as e:
      raise ValueError(f"{where}: {e} (activation shape {jnp.shape(lhs)}, kernel shape {rhs_shape})") from None
    if dims.rhs_sum_axes:
      raise ValueError(
        f"{where}: einsum {equation!r} sums kernel axes {dims.rhs_sum_axes} on their own; a quantized einsum needs "
        "every kernel axis contracted with the activation or kept in the output."
      )
    if dims.lhs_sum_axes:
      lhs = jnp.sum(lhs, axis=dims.lhs_sum_axes)
    y = self.dot(
      lhs,
      rhs,
      dims.dimension_numbers,
      precision,
      preferred_element_type,
      _permuted_sharding(out_sharding, dims.out_perm),
      op="einsum",
    )
    return jnp.transpose(y, dims.out_perm)

  def convert(self, kernel, equation: str | None = None, *, where: str = "nnx.Einsum") -> None:
    """Stores ``kernel`` quantized for the einsum ``equation``, and the frozen activation range, for serving."""
    if equation is None:
      raise ValueError(
        f"{self._where()}: convert needs the einsum equation; give it to {where}(einsum_str=...) at construction."
      )
    kernel = jnp.asarray(kernel)
    (_, rc), (_, rb) = _kernel_dims(equation, kernel.ndim, self._where()).dimension_numbers
    super().convert(kernel, rc, rb)

  def kernel_config(self, equation: str, kernel_ndim: int) -> QatConfig | None:
    (_, rc), (_, rb) = _kernel_dims(equation, kernel_ndim, self._where()).dimension_numbers
    return common.operand_config(self.rhs_config, kernel_ndim, rc, rb)


class QatEinsum(nnx.Einsum):
  """``flax.nnx.Einsum`` with quantization-aware training: same arguments and parameters.

  Adds ``weight_config``, ``activation_config``, ``mode`` and ``momentum``;
  the einsum runs through a ``QatEinsumOp`` in ``self.einsum_op``.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> layer = jqat.nnx.QatEinsum("bsd,ckdh->cbskh", (3, 2, 4, 5), rngs=nnx.Rngs(0))  # weight axes lead the output
    >>> layer.kernel.shape, layer(jnp.ones((1, 7, 4))).shape
    ((3, 2, 4, 5), (3, 1, 7, 2, 5))
  """

  def __init__(
    self,
    einsum_str: str,
    kernel_shape,
    bias_shape=None,
    *,
    weight_config: QatConfig | str | None = common.DEFAULT_WEIGHT_CONFIG,
    activation_config: QatConfig | str | None = common.DEFAULT_ACTIVATION_CONFIG,
    mode: str = "qat",
    momentum: float = 0.9,
    rngs: nnx.Rngs,
    **kwargs,
  ):
    if "einsum_op" in kwargs:
      raise ValueError("QatEinsum quantizes through its own QatEinsumOp; pass einsum_op to nnx.Einsum instead.")
    weight_config, activation_config = qnnx._configs("QatEinsum", weight_config, activation_config)
    op = QatEinsumOp(lhs_config=activation_config, rhs_config=weight_config, mode=mode, momentum=momentum)
    super().__init__(einsum_str, kernel_shape, bias_shape, einsum_op=op, rngs=rngs, **kwargs)
    if common.uses_lsq(weight_config):
      op.init_lsq(self.kernel[...], op.kernel_config(self.einsum_str, len(self.kernel_shape)))


# --- embeddings ----------------------------------------------------------------------


def _table_config(config: QatConfig | None) -> QatConfig | None:
  # A table (num_embeddings, features) in attend contracts its features: one
  # scale per row (and groups along the features).
  return common.operand_config(config, 2, (1,), ())


def _gather_rows(wq, ids):
  """Dequantized rows ``ids`` of a quantized table, without dequantizing the rest."""
  cfg = wq.config
  if cfg.bits.is_packed:
    if qtensor_lib.PACK_AXIS != 0:
      return jnp.take(qtensor_lib.dequantize(wq), ids, axis=0)
    byte_rows = jnp.take(wq.values, ids // 2, axis=0)
    nibble = jnp.where((ids % 2 == 0)[..., None], byte_rows & 0xF, byte_rows >> 4).astype(jnp.int8)
    q = ((nibble ^ 8) - 8).astype(jnp.float32)  # sign-extend a 4-bit value
  else:
    q = jnp.take(wq.values, ids, axis=0).astype(jnp.float32)
  scale = jnp.take(jnp.asarray(wq.scale, jnp.float32).reshape(wq.shape[0], -1), ids, axis=0)
  zp = jnp.take(jnp.asarray(wq.zero_point, jnp.float32).reshape(wq.shape[0], -1), ids, axis=0)
  groups = scale.shape[-1]
  q = q.reshape(q.shape[:-1] + (groups, -1))
  return ((q - zp[..., None]) * scale[..., None]).reshape(q.shape[:-2] + (-1,))


class QatEmbed(nnx.Embed):
  """``flax.nnx.Embed`` with a quantized table: same arguments and parameter, lookup and ``attend``.

  One table, quantized per row (``weight_config``, default int8 symmetric),
  serves the lookup and ``attend`` (tied logits, ``query @ table.T``), whose
  query is quantized with ``activation_config`` (default None: weight-only).
  After ``jqat.nnx.convert`` only the quantized table is stored.

  Examples:
    >>> import jax.numpy as jnp, jqat
    >>> from flax import nnx
    >>> emb = jqat.nnx.QatEmbed(10, 4, rngs=nnx.Rngs(0))
    >>> emb(jnp.array([[1, 2, 3]])).shape, emb.attend(jnp.ones((1, 3, 4))).shape
    ((1, 3, 4), (1, 3, 10))
  """

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    weight_config: QatConfig | str | None = DEFAULT_EMBEDDING,
    activation_config: QatConfig | str | None = None,
    mode: str = "qat",
    momentum: float = 0.9,
    rngs: nnx.Rngs,
    **kwargs,
  ):
    for name, n in (("num_embeddings", num_embeddings), ("features", features)):
      if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"QatEmbed: {name}={n!r} is invalid; allowed: a positive int.")
    weight_config = common.as_config(weight_config, DEFAULT_EMBEDDING, "weight_config", "QatEmbed")
    activation_config = common.as_config(
      activation_config, common.DEFAULT_ACTIVATION_CONFIG, "activation_config", "QatEmbed"
    )
    super().__init__(num_embeddings, features, rngs=rngs, **kwargs)
    self.quant = qnnx.QatDotGeneral(
      lhs_config=activation_config, rhs_config=weight_config, mode=mode, momentum=momentum
    )
    self.quant.init_lsq(self.embedding[...], _table_config(weight_config))

  @classmethod
  def from_embed(cls, embed: nnx.Embed, *, weight_config, activation_config, mode="qat", momentum=0.9) -> QatEmbed:
    """A ``QatEmbed`` holding ``embed``'s own parameter (the same ``nnx.Param``), for graph surgery."""
    new = cls(
      1,
      embed.features,
      weight_config=None,
      activation_config=None,
      dtype=embed.dtype,
      param_dtype=embed.param_dtype,
      promote_dtype=embed.promote_dtype,
      rngs=nnx.Rngs(0),
    )
    new.embedding = embed.embedding
    new.num_embeddings = embed.num_embeddings
    new.quant = qnnx.QatDotGeneral(lhs_config=activation_config, rhs_config=weight_config, mode=mode, momentum=momentum)
    new.quant.init_lsq(embed.embedding[...], _table_config(weight_config))
    return new

  def _where(self) -> str:
    path = self.quant.path or ""
    if path == "quant" or path.endswith("/quant"):  # named by quantizers(): the op's path, not the layer's
      path = path[: -len("quant")].rstrip("/")
    return f"QatEmbed at '{path}'" if path else "QatEmbed"

  def _table_cfg(self):
    return None if self.quant.is_float else _table_config(self.quant.rhs_config)

  def __call__(self, inputs, out_sharding=None):
    inputs = jnp.asarray(inputs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"{self._where()}: the lookup needs integer ids, got dtype {inputs.dtype}.")
    shape = (self.num_embeddings, self.features)
    cfg = self._table_cfg()
    qnnx._record(self.quant, "embed", inputs.shape, shape, None, cfg, self.param_dtype)
    if cfg is not None and self.quant.is_converted:
      wq = self.quant._served_weight(cfg, shape)
      rows = common.with_out_sharding(lambda i: _gather_rows(wq, i), out_sharding)(inputs)
      return rows.astype(self.dtype)
    if cfg is None or self.quant.mode == "calibrate":
      return super().__call__(inputs, out_sharding=out_sharding)
    (table,) = self.promote_dtype((self.embedding[...],), dtype=self.dtype, inexact=False)
    table = fake_quant(table, self.quant._rhs_qparams(table, cfg), cfg)
    return common.with_out_sharding(lambda t, i: jnp.take(t, i, axis=0), out_sharding)(table, inputs)

  def attend(self, query, out_sharding=None):
    """Tied logits ``query @ table.T`` with the quantized table (and query when ``activation_config`` is set)."""
    query = jnp.asarray(query)
    if query.shape[-1:] != (self.features,):
      raise ValueError(
        f"{self._where()}: attend needs a query ending in {self.features} features, got shape {query.shape}."
      )
    table = self.embedding[...]
    query, table = self.promote_dtype((query, table), dtype=self.dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    return self.quant.dot(query, table, dims, out_sharding=out_sharding, op="attend")

  def convert(self) -> None:
    """Quantizes the table for serving (one copy for lookup and attend) and drops the float table."""
    q = self.quant
    if q.is_float or q.rhs_config is None or q.is_converted:
      return
    q.convert(self.embedding[...], contracting=(1,))
    qnnx._drop(self, "embedding")
