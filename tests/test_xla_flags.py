"""training/xla_flags.py: the XLA CPU flags the training script sets for jax."""

import subprocess
import sys
import textwrap

import pytest

from training import jax_platform, xla_flags

pytestmark = pytest.mark.any_backend

ADDED = f"{xla_flags.FLAG}={xla_flags.VALUE}"


@pytest.fixture
def cpu_machine(monkeypatch):
    """No accelerator plugin installed and no TPU device files."""
    monkeypatch.setattr(jax_platform, "_installed_distributions", lambda: ["jaxlib"])
    monkeypatch.setattr(jax_platform, "_device_files", lambda: [])


def test_appends_to_existing_flags_under_jax(monkeypatch, cpu_machine):
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
def test_leaves_xla_flags_alone(monkeypatch, cpu_machine, backend, environ, jaxlib):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: jaxlib)
    before = dict(environ)
    assert xla_flags.tune_xla_cpu(backend, environ) == []
    assert environ == before


@pytest.mark.parametrize(
    "environ, plugins, files, reason",
    [
        ({"JAX_PLATFORMS": "tpu"}, [], [], "JAX_PLATFORMS=tpu"),
        ({"JAX_PLATFORMS": "cuda,cpu"}, [], [], "JAX_PLATFORMS=cuda,cpu"),
        ({"JAX_PLATFORM_NAME": "gpu"}, [], [], "JAX_PLATFORM_NAME=gpu"),
        ({}, ["libtpu"], [], "libtpu is installed"),
        ({}, ["jax-cuda12-plugin", "jax-cuda12-pjrt"], [], "jax-cuda12-pjrt"),
        ({}, ["jax-rocm7-plugin"], [], "jax-rocm7-plugin is installed"),
        ({"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1"}, [], [], "TPU_WORKER_HOSTNAMES"),
        ({}, [], ["/dev/accel0"], "/dev/accel0 exists"),
        ({}, [], ["/dev/vfio/0"], "/dev/vfio/0 exists"),
    ],
)
def test_no_cpu_flag_when_jax_will_run_on_an_accelerator(
    monkeypatch, environ, plugins, files, reason
):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10, 2))
    monkeypatch.setattr(jax_platform, "_installed_distributions", lambda: plugins)
    monkeypatch.setattr(jax_platform, "_device_files", lambda: files)
    assert reason in jax_platform.accelerator(environ)
    before = dict(environ)
    assert xla_flags.tune_xla_cpu("jax", environ) == []
    assert environ == before


@pytest.mark.parametrize("platforms", ["cpu", "CPU", "cpu,cpu"])
def test_jax_platforms_cpu_wins_over_installed_plugins(monkeypatch, platforms):
    """JAX_PLATFORMS=cpu makes jax use the CPU even where libtpu is installed."""
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10, 2))
    monkeypatch.setattr(jax_platform, "_installed_distributions", lambda: ["libtpu"])
    monkeypatch.setattr(jax_platform, "_device_files", lambda: ["/dev/accel0"])
    environ = {"JAX_PLATFORMS": platforms}
    assert jax_platform.accelerator(environ) is None
    assert xla_flags.tune_xla_cpu("jax", environ) == [ADDED]


def test_this_machine_has_no_accelerator():
    """The scan itself runs (this CPU-only test machine has no plugin)."""
    names = list(jax_platform._installed_distributions())
    assert "jaxlib" in names or "keras" in names
    if not any(n.startswith(jax_platform.PLUGIN_PREFIXES) for n in names):
        assert jax_platform.accelerator({}) in (None, *_tpu_vm_reasons())


def _tpu_vm_reasons():
    return [f"{path} exists (a TPU VM)" for path in jax_platform._device_files()]


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
