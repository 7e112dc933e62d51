"""`make gpu-check`'s script runs end to end on CPU (``--dry-run``: tiny shapes, interpret mode)
and fails loudly, naming the section, when a check fails."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_dry_run_passes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "all sections passed" in done.stdout
    results = json.loads(out.read_text())["sections"]
    assert set(results) == {"report", "kernel correctness", "kernel speed", "train the reference GPT",
                            "tests marked gpu"}
    assert all(row["ok"] for row in results["kernel correctness"].values())
    for run in results["train the reference GPT"].values():
        assert run["loss_last"] < run["loss_first"]


def test_a_spent_budget_fails_loudly():
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--budget-s", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "FAILED" in done.stdout and "kernel correctness: not run" in done.stdout


def test_no_benchmark_shadows_a_module_jax_may_import():
    """A script's folder leads sys.path: benchmarks/compression.py once hid the (Python 3.14)
    stdlib package ``compression`` that jax's compilation cache imports, and broke every script."""
    import importlib.util
    later_stdlib = {"compression", "annotationlib", "string.templatelib"}   # 3.12-3.14 additions
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        name = script.stem
        assert name not in sys.stdlib_module_names and name not in later_stdlib, script
        spec = importlib.util.find_spec(name)      # an installed package of that name
        assert spec is None or "site-packages" not in str(spec.origin), (script, spec)
