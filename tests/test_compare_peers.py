"""benchmarks/compare_peers.py: error measurement, table formatting and skipped peers, with jqat alone."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compare_peers.py"


@pytest.fixture(scope="module")
def cp():
  spec = importlib.util.spec_from_file_location("compare_peers", _PATH)
  module = importlib.util.module_from_spec(spec)
  path, modules = list(sys.path), set(sys.modules)
  sys.modules[spec.name] = module  # dataclasses look their module up by name
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.path[:] = path
    for name in set(sys.modules) - modules:
      if name in (spec.name, "bench_qat_step", "bench_serving"):
        del sys.modules[name]


JQAT_ONLY = {"jqat": "test", "qwix": None, "aqt": None}


def test_missing_peer_is_none(cp):
  assert cp.peer_version("jqat_no_such_module_for_tests") is None
  assert cp.peer_version("numpy") == np.__version__


def test_relative_error(cp):
  ref = np.array([[3.0, 4.0]])
  assert cp.relative_error(ref, ref) == 0.0
  assert cp.relative_error(1.1 * ref, ref) == pytest.approx(0.1, rel=1e-12)


def _numpy_per_tensor_product(x, w, qmax):
  # Independent reference: symmetric absmax, scale amax / qmax, full signed range, half to even.
  def fq(a):
    s = np.abs(a).max() / qmax
    return np.clip(np.round(a / s), -qmax - 1, qmax) * s

  return fq(np.asarray(x, np.float64)) @ fq(np.asarray(w, np.float64))


def test_quant_errors_jqat_alone(cp):
  x, w = cp.outlier_operands(m=16, k=64, n=8, channel=3, factor=50.0)
  assert float(jnp.abs(x[:, 3]).mean()) > 10 * float(jnp.abs(x[:, 4]).mean())
  errors = cp.quant_errors(JQAT_ONLY, x=x, w=w, granularities=("tensor", "group32"))
  assert set(errors) == {"int8", "int4"}
  for fmt in ("int8", "int4"):
    row = errors[fmt]
    for gran in ("tensor", "group32"):
      assert row[gran]["qwix"] == cp.SKIPPED and row[gran]["aqt"] == cp.SKIPPED
      assert 0.0 < row[gran]["jqat"] < 1.0
    # Finer scales isolate the outlier channel: per-group error is the smallest.
    assert row["group32"]["jqat"] < row["tensor"]["jqat"]
  # int4 is coarser than int8 at every granularity.
  assert all(errors["int4"][g]["jqat"] > errors["int8"][g]["jqat"] for g in ("tensor", "group32"))
  ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  for bits, qmax in ((8, 127), (4, 7)):
    expected = cp.relative_error(_numpy_per_tensor_product(x, w, qmax), ref)
    # float32 rescale of the int32 sums against float64: far below the errors compared.
    assert errors[f"int{bits}"]["tensor"]["jqat"] == pytest.approx(expected, rel=1e-4)


def test_quantized_product_rejects_unknown_granularity(cp):
  x = jnp.ones((4, 32))
  with pytest.raises(ValueError, match="granularity"):
    cp.quantized_product("jqat", x, x.T, 8, "rows")


def _rows(table: str, header_start: str):
  lines = table.splitlines()
  i = next(j for j, line in enumerate(lines) if line.startswith(header_start))
  out = []
  for line in lines[i:]:
    if not line.startswith("|"):
      break
    out.append(line)
  return out


def test_markdown_marks_skipped_peers(cp):
  results = {
    "meta": {
      "processor": "x86_64",
      "cpu_count": 2,
      "backend": "cpu",
      "jax": jax.__version__,
      "versions": JQAT_ONLY,
      "command": "python benchmarks/compare_peers.py --quick",
      "wall_s": 12.0,
    },
    "qat_step": {
      "mlp": {
        "float": {"ms": 10.0, "ratio": 1.0},
        "jqat": {"ms": 9.0, "ratio": 0.9},
        "qwix": cp.SKIPPED,
        "aqt": cp.SKIPPED,
      }
    },
    "serving": {
      "8x16x16": {
        "float32": {"ms": 1.0, "ratio": 1.0},
        "jqat w8a8": {"ms": 0.5, "ratio": 0.5},
        "qwix w8a8": cp.SKIPPED,
      }
    },
    "quant_error": {"int8": {"tensor": {"jqat": 0.01, "qwix": cp.SKIPPED, "aqt": cp.SKIPPED}}},
    "accuracy": {"float": 0.97, "w8a8": {"jqat": 0.975, "qwix": cp.SKIPPED, "aqt": cp.SKIPPED}},
  }
  table = cp.markdown(results)
  assert "jax " + jax.__version__ in table and "qwix skipped (not installed)" in table
  assert "`python benchmarks/compare_peers.py --quick`" in table
  for header in ("| model |", "| (M, K, N) |", "| format |", "| QAT |"):
    rows = _rows(table, header)
    assert len(rows) >= 3
    assert len({row.count("|") for row in rows}) == 1, rows  # every row has the header's columns
  assert "| MLP 784-1024-1024-10, batch 256 | 10.0 | 9.0 (0.90x) | skipped | skipped | skipped |" in table
  assert "| 8, 16, 16 | 1.000 (1.00x) | 0.500 (0.50x) | skipped |" in table
  assert "| int8 | tensor | **1.0000e-02** | skipped | skipped |" in table
  assert "0.9750 | skipped | skipped |" in table
