"""The README's quick-start example runs as shipped and learns."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(m) for m in re.findall(r"'loss': ([0-9.]+)", out.stdout)]
    assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0]
    # w1 is (16, 64): split along its largest dimension over 8 devices, in its own shape
    assert "w1 master shard on one device: (16, 8)" in out.stdout
