"""The public names of jqat exist and the numeric core imports on its own."""

import subprocess
import sys

import jqat

# The contract of DESIGN.md for the numeric core.
CORE_NAMES = (
  "QatConfig",
  "QuantBits",
  "CalibMethod",
  "QParams",
  "QTensor",
  "qparams_from_range",
  "fake_quant",
  "quantize",
  "dequantize",
)


def test_all_names_exist():
  missing = [name for name in jqat.__all__ if not hasattr(jqat, name)]
  assert not missing
  assert len(set(jqat.__all__)) == len(jqat.__all__)


def test_core_names_are_exported():
  assert set(CORE_NAMES) <= set(jqat.__all__)


def test_version():
  assert isinstance(jqat.__version__, str)
  assert jqat.__version__.count(".") >= 1


def test_core_imports_without_flax():
  code = (
    "import sys\n"
    "from jqat._src import config, fake_quant, formats, qparams, qtensor\n"
    "assert not any(m == 'flax' or m.startswith('flax.') for m in sys.modules), 'flax imported'\n"
  )
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_flax_namespaces_export_what_they_import():
  import jqat.linen
  import jqat.nnx

  for mod in (jqat.linen, jqat.nnx):
    public = {n for n in vars(mod) if not n.startswith("_")}
    assert set(mod.__all__) == public, mod.__name__
