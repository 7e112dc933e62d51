"""The architecture lives in the repository: docs/architecture.md names every module, and
no tracked file cites a document outside the repository."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# Built from parts so that this file does not match itself.
OUTSIDE = ("DESIGN" + ".md", "../" + "shared", "/work/" + "shared", "JAX_" + "NOTES", "STYLE" + ".md")


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return [ROOT / name for name in out.stdout.decode().split("\0") if name]


def test_no_tracked_file_cites_a_document_outside_the_repository():
    found = []
    for path in tracked_files():
        if not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        found += [f"{path.relative_to(ROOT)}: {ref}" for ref in OUTSIDE if ref in text]
    assert found == []


def test_the_architecture_names_every_module():
    section = DOC.read_text().split("## Modules today (built)", 1)[1].split("\n## ", 1)[0]
    modules = sorted(p for package in ("zjax", "pallas_kernels") for p in (ROOT / package).rglob("*.py"))
    missing = [str(p.relative_to(ROOT)) for p in modules if p.name not in section]
    assert missing == [], "docs/architecture.md does not describe these modules"
