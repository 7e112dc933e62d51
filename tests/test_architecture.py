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


# The layers of docs/architecture.md, lowest first: a module imports only from its own layer or below.
LAYERS = [
    ("zjax.errors", "pallas_kernels"),
    ("zjax.config",),
    ("zjax.parallel",),
    ("zjax.layers", "zjax.models", "zjax.train", "zjax.compression"),
    ("zjax.checkpoint", "zjax.export", "zjax.data", "zjax.distributed", "zjax.train.loop", "zjax.inference",
     "zjax.compression.distill", "zjax.compression.clean", "zjax.rlhf"),
    ("zjax.analysis",),
    ("zjax.cli", "zjax.__main__", "zjax"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The highest layer whose prefix names the module (``zjax.train.loop`` sits above ``zjax.train``)."""
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def import_graph() -> dict[str, set[str]]:
    """Every module of zjax and pallas_kernels -> the modules of theirs it imports (any line,
    in functions too); ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    import ast

    paths = sorted(p for package in ("zjax", "pallas_kernels") for p in (ROOT / package).rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_imports_run_one_way_down_the_layers():
    upward = [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
              for a, targets in import_graph().items() for b in targets if layer_of(b) > layer_of(a)]
    assert upward == []


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_jax_import_where_a_public_api_exists():
    """``jax._src`` only where JAX has no public API for the thing (each use says why)."""
    allowed = {
        # saved_residuals as data: jax.ad_checkpoint.print_saved_residuals only prints it
        "zjax/layers.py": "jax._src.ad_checkpoint",
        # whether this is a Cloud TPU VM (JAX's own check; no public API)
        "zjax/distributed.py": "jax._src.cloud_tpu_init",
    }
    found = []
    for package in ("zjax", "pallas_kernels"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if "jax._src" in path.read_text() and rel not in allowed:
                found.append(rel)
    assert found == []
