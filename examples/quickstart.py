"""A first look at jqat: quantize a tensor to int8, int4 and fp8, and train through it.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp

import jqat


def main():
  x = jax.random.normal(jax.random.key(0), (256, 64))
  print(f"{'format':<10} {'granularity':<12} {'max |err|':>10} {'bytes':>7} (float32: {x.nbytes})")
  for bits in ("int8", "int4", "fp8_e4m3"):
    for per_channel in (False, True):
      cfg = jqat.QatConfig(bits=bits, per_channel=per_channel)
      qp = jqat.qparams_from_array(x, cfg)
      q = jqat.quantize(x, qp, cfg)
      err = float(jnp.max(jnp.abs(jqat.dequantize(q) - x)))
      gran = "channel" if per_channel else "tensor"
      print(f"{bits:<10} {gran:<12} {err:>10.4f} {q.nbytes:>7}")

  # Straight-through gradient: 1 inside the representable range, 0 outside.
  cfg = jqat.QatConfig(bits="int8")
  qp = jqat.qparams_from_range(-1.0, 1.0, cfg)
  g = jax.grad(lambda v: jqat.fake_quant(v, qp, cfg).sum())(jnp.array([-2.0, -0.5, 0.5, 2.0]))
  print("STE gradient at [-2, -0.5, 0.5, 2]:", g.tolist())


if __name__ == "__main__":
  main()
