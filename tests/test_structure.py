"""The shape of the code base, which readers rely on: no import cycle anywhere (counting the
imports inside functions, which can hide one), the models importing none of the machinery
around them, and every module of minisd/ short enough to hold in one's head."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400
# The model files hold the math only: they may import the loader and config, not the layers
# above them (the pipeline, the speed levers, the command line).
MODEL_FILES = ("tokenizer", "bpe", "clip", "unet", "vae", "dpm_solver", "safety")
ABOVE_THE_MODELS = ("pipeline", "fast", "runtime", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    files = [*ROOT.glob("minisd/*.py"), *ROOT.glob("tools/*.py"), *ROOT.glob("examples/*.py")]
    return {module_name(p): p for p in files}


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The repository's modules that `name` imports anywhere in its file."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: inside minisd
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            candidates = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            # tools/ and examples/ import their siblings by bare name (they run as scripts).
            for full in (candidate, f"{package}.{candidate}" if package in ("tools", "examples") else None):
                if full in known and full != name:
                    found.add(full)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_the_graph_sees_imports():  # the test below would pass on an empty graph
    g = graph()
    assert "minisd.unet" in g["minisd.fast"] and "minisd.checkpoint" in g["minisd.unet"]
    assert "tools.shapes" in g["tools.eval_shapes"] and "minisd" not in g["minisd.unet"]


def test_no_import_cycles():
    g, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(g[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    assert not cycles


@pytest.mark.parametrize("model", MODEL_FILES)
def test_model_files_do_not_import_the_machinery_above_them(model):
    above = {f"minisd.{m}" for m in ABOVE_THE_MODELS}
    assert not graph()[f"minisd.{model}"] & above


@pytest.mark.parametrize("path", sorted(ROOT.glob("minisd/*.py")), ids=lambda p: p.name)
def test_modules_are_short(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
