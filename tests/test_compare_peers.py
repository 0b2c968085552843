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


def test_interleaved_rotates_the_order_and_keeps_each_best(cp):
  calls, clock = [], iter(range(100))

  def timer(name, values):
    seq = iter(values)

    def run():
      calls.append((name, next(clock)))
      return next(seq)

    return run

  best = cp.interleaved({"a": timer("a", [5.0, 3.0, 4.0]), "b": timer("b", [2.0, 6.0, 1.0])}, rounds=3)
  assert best == {"a": 3.0, "b": 1.0}  # the minimum of each function's rounds
  assert [n for n, _ in calls] == ["a", "b", "b", "a", "a", "b"]  # round r starts at function r mod n


def test_ratio_row_divides_by_the_baseline_of_the_same_run(cp):
  row = cp.ratio_row({"float": 8.0, "jqat": 6.0, "aqt": 10.0}, "float")
  assert row == {
    "float": {"ms": 8.0, "ratio": 1.0},
    "jqat": {"ms": 6.0, "ratio": 0.75},
    "aqt": {"ms": 10.0, "ratio": 1.25},
  }
  with pytest.raises(ValueError, match="positive time"):
    cp.ratio_row({"float": 0.0, "jqat": 1.0}, "float")


def test_serving_section_measures_ratios_against_its_own_float_run(cp):
  settings = cp.Settings(reps=3, rounds=2, models=(), shapes=((8, 32, 16),), float_steps=0, qat_steps=0,
                         accuracy_bits=())  # fmt: skip
  row = cp.bench_serving_shapes(settings, JQAT_ONLY)["8x32x16"]
  assert row["qwix w8a8"] == row["qwix weight-only"] == cp.SKIPPED
  timed = {k: v for k, v in row.items() if v != cp.SKIPPED}
  assert set(timed) == {"float32", "raw int8 dot", "jqat w8a8", "jqat weight-only"}
  assert timed["float32"]["ratio"] == 1.0
  for v in timed.values():
    assert v["ms"] > 0
    assert v["ratio"] == pytest.approx(v["ms"] / timed["float32"]["ms"], rel=1e-12)


def test_compile_section_times_each_step_against_float(cp, monkeypatch):
  # Real jitted steps of a small float and jqat layer (the benchmark's models take seconds to compile).
  import optax

  import jqat

  opt, x, y = optax.sgd(0.1), jnp.ones((4, 8)), jnp.zeros((4, 3))

  def small_steps(name, versions, opt=opt):
    assert name == "small"
    steps = {}
    for lib, model in (("float", cp.nn.Dense(3)), ("jqat", jqat.linen.QatDense(3))):
      v = model.init(jax.random.key(0), x)
      step = cp.bench_qat_step.make_step(model, lambda out, y: jnp.mean((out - y) ** 2), opt)
      steps[lib] = (step, (v["params"], v.get("quant_stats", {}), opt.init(v["params"])))
    return steps, x, y

  monkeypatch.setattr(cp, "qat_steps", small_steps)
  settings = cp.Settings(reps=1, rounds=1, models=(), shapes=(), float_steps=0, qat_steps=0, accuracy_bits=(),
                         compile_models=("small",))  # fmt: skip
  row = cp.bench_compile(settings, JQAT_ONLY)["small"]
  assert row["jqat-sym"] == row["jqat-tok"] == row["qwix"] == row["aqt"] == cp.SKIPPED
  assert row["float"]["ratio"] == 1.0 and row["jqat"]["ms"] > 0
  assert row["jqat"]["ratio"] == pytest.approx(row["jqat"]["ms"] / row["float"]["ms"], rel=1e-12)


def test_main_rejects_an_unknown_section(cp):
  with pytest.raises(SystemExit):
    cp.main(["--sections", "qat_step,compile_time"])


def _tables(text: str) -> dict[str, list[list[str]]]:
  """Every markdown table of ``text`` as rows of stripped cells, keyed by its header's first cell."""
  tables, current = {}, None
  for line in text.splitlines():
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip("|").split("|")]
      if current is None:
        current = tables.setdefault(cells[0], [cells])
      elif not set(line) <= set("|-: "):
        current.append(cells)
    else:
      current = None
  return tables


def _timed(cell: str) -> tuple[float, float]:
  ms, ratio = cell.split(" (")
  return float(ms), float(ratio.rstrip("x)"))


def test_markdown_tables_show_the_results_they_are_given(cp):
  results = {
    "meta": {"processor": "x86_64", "cpu_count": 2, "backend": "cpu", "jax": jax.__version__,
             "versions": JQAT_ONLY, "command": "python benchmarks/compare_peers.py --quick", "wall_s": 12.0},
    "qat_step": {"mlp": {"float": {"ms": 10.0, "ratio": 1.0}, "jqat": {"ms": 9.0, "ratio": 0.9},
                         "jqat-sym": {"ms": 8.5, "ratio": 0.85}, "jqat-tok": {"ms": 8.0, "ratio": 0.8},
                         "qwix": cp.SKIPPED, "aqt": cp.SKIPPED}},
    "compile": {"block12": cp.ratio_row({"float": 2000.0, "jqat": 2500.0, "jqat-sym": 2400.0, "jqat-tok": 2300.0},
                                        "float")
                | {"qwix": cp.SKIPPED, "aqt": cp.SKIPPED}},
    "serving": {"8x16x16": cp.ratio_row({"float32": 1.0, "jqat w8a8": 0.5}, "float32") | {"qwix w8a8": cp.SKIPPED}},
    "quant_error": {"int8": {"tensor": {"jqat": 0.01, "qwix": 0.02, "aqt": cp.SKIPPED}}},
    "accuracy": {"float": 0.97, "w8a8": {"jqat": 0.975, "qwix": cp.SKIPPED, "aqt": cp.SKIPPED}},
  }  # fmt: skip
  text = cp.markdown(results)
  assert "qwix skipped (not installed)" in text
  tables = _tables(text)
  assert set(tables) == {"model", "compiled step", "(M, K, N)", "format", "QAT"}
  for rows in tables.values():
    assert len({len(r) for r in rows}) == 1, rows  # every row has the header's columns
  # QAT step: float ms, then "ms (ratio)" per library in QAT_LIBS order; the ratio is ms / float ms.
  header, (mlp,) = tables["model"][0], tables["model"][1:]
  assert len(header) == len(cp.QAT_LIBS) + 1
  assert float(mlp[1]) == 10.0
  for lib, cell in zip(cp.QAT_LIBS[1:], mlp[2:]):
    r = results["qat_step"]["mlp"][lib]
    if r == cp.SKIPPED:
      assert cell == cp.SKIPPED
    else:
      ms, ratio = _timed(cell)
      assert ms == r["ms"] and ratio == pytest.approx(ms / 10.0, abs=0.005)  # printed to 2 decimals
  # Compile time: seconds, then "s (ratio)" per library, the ratio against float.
  (row,) = tables["compiled step"][1:]
  assert row[0].startswith("12 transformer blocks") and float(row[1]) == 2.0
  assert [_timed(c) for c in row[2:5]] == [(2.5, 1.25), (2.4, 1.2), (2.3, 1.15)]
  assert row[5:] == [cp.SKIPPED, cp.SKIPPED]
  # Serving: one column per variant, same rule.
  header, (row,) = tables["(M, K, N)"][0], tables["(M, K, N)"][1:]
  assert [int(v) for v in row[0].split(",")] == [8, 16, 16]
  for variant, cell in zip(header[1:], row[1:]):
    r = results["serving"]["8x16x16"][variant]
    assert cell == cp.SKIPPED if r == cp.SKIPPED else _timed(cell) == (r["ms"], round(r["ratio"], 2))
  # Quantization error: the smallest error of the row, and only it, is bold.
  (err,) = tables["format"][1:]
  cells = dict(zip(cp.LIBS, err[2:]))
  assert cells["jqat"].startswith("**") and not cells["qwix"].startswith("**") and cells["aqt"] == cp.SKIPPED
  assert float(cells["jqat"].strip("*")) == 0.01 and float(cells["qwix"]) == 0.02
  # Accuracy: one row per QAT format, the values as given.
  (acc,) = tables["QAT"][1:]
  assert float(acc[1]) == 0.975 and acc[2:] == [cp.SKIPPED, cp.SKIPPED]
