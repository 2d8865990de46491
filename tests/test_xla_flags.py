"""training/xla_flags.py: the XLA CPU flags the training script sets for jax."""

import subprocess
import sys
import textwrap

import pytest

from training import xla_flags

ADDED = f"{xla_flags.FLAG}={xla_flags.VALUE}"


def test_appends_to_existing_flags_under_jax(monkeypatch):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10, 2))
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_flags.tune_xla_cpu("jax", environ) == [ADDED]
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {ADDED}"
    environ = {}
    assert xla_flags.tune_xla_cpu("jax", environ) == [ADDED]
    assert environ == {"XLA_FLAGS": ADDED}


@pytest.mark.parametrize(
    "backend, environ, jaxlib",
    [
        ("tensorflow", {}, (0, 10, 2)),  # TensorFlow's XLA may not know the flag
        ("torch", {}, (0, 10, 2)),
        ("jax", {"SYNANN_XLA_FLAGS": "0"}, (0, 10, 2)),  # the switch
        ("jax", {"XLA_FLAGS": f"{xla_flags.FLAG}=dot"}, (0, 10, 2)),  # yours wins
        ("jax", {}, (0, 8, 1)),  # no such fusion type yet: XLA would abort
        ("jax", {}, (0,)),  # no jaxlib
    ],
)
def test_leaves_xla_flags_alone(monkeypatch, backend, environ, jaxlib):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: jaxlib)
    before = dict(environ)
    assert xla_flags.tune_xla_cpu(backend, environ) == []
    assert environ == before


#: Applies the flags, then compiles a convolution with the installed jaxlib and
#: prints the optimized HLO's lines that hold it.
_COMPILE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, ".")
    from training import xla_flags
    print("added", xla_flags.tune_xla_cpu("jax"))
    import jax, jax.numpy as jnp
    from jax import lax
    conv = jax.jit(lambda x, k: lax.conv_general_dilated(
        x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")))
    hlo = conv.lower(jnp.ones((2, 12, 12, 16)), jnp.ones((5, 5, 16, 32)))
    for line in hlo.compile().as_text().splitlines():
        if "conv_general_dilated" in line:
            print(line)
    """
)


def test_installed_jaxlib_takes_the_flags_and_keeps_convolutions_out_of_ynn():
    """With the installed jaxlib: no abort on an unknown flag, and when the
    flag is added the compiled convolution is XLA's, not a YNNPACK fusion."""
    pytest.importorskip("jax")
    out = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        env={"PATH": "", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    added, *hlo = out.stdout.splitlines()
    assert any(" convolution(" in line for line in hlo), out.stdout
    if ADDED in added:
        assert not any("__ynn_fusion" in line for line in hlo), out.stdout
