"""``zjax report``: versions, backend, devices and kernel support."""
import json

from zjax.cli import main
from zjax.analysis.report import report


def test_report_names_the_backend_and_devices(capsys):
    assert main(["report"]) == 0
    out = capsys.readouterr().out
    assert "backend: cpu" in out
    assert "devices: 8 (8 x cpu)" in out
    assert "memory unknown" in out
    assert "flash_attention       xla" in out


def test_report_json_has_versions_and_every_kernel(capsys):
    assert main(["report", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["versions"]) >= {"python", "zjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"}
    assert "not installed" not in out["versions"].values()
    assert set(out["kernels"]) == {"rms_norm", "layer_norm", "flash_attention", "swiglu", "geglu",
                                   "softmax_cross_entropy", "unscale_and_check"}
    assert out["distributed"].startswith("available, not initialized")


def test_cpu_memory_is_unknown():
    assert all(d["memory_bytes"] is None for d in report()["devices"])
