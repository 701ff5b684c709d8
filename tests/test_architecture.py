"""The layout rules, checked on the source so they stay true: who may import whom, no cycles, thin entry points,
short library functions, a library that imports without starting Ray."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "platform"
TOPS = ("med3dvlm", "pipelines", "serve", "tuning", "bench")


def module_name(path: Path) -> str:
    rel = path.relative_to(LIB if LIB in path.parents else ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    files = list((LIB / "med3dvlm").rglob("*.py"))
    for top in TOPS[1:]:
        files += list((ROOT / top).rglob("*.py"))
    return {module_name(f): f for f in files}


def imports(path: Path, name: str = "") -> set[str]:
    """Every module a file imports, at any depth (function-level imports included), as absolute names (relative
    imports resolved against the module's own `name`)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    mods = sources()
    return {m: {i for i in imports(p, m) if i in mods and i != m} for m, p in mods.items()}


def under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_who_imports_whom():
    bad = []
    for m, deps in graph().items():
        for d in deps:
            if under(m, "med3dvlm") and under(d, "pipelines", "serve", "tuning", "bench"):
                bad.append((m, d))
            if under(m, "serve", "tuning", "bench") and under(d, "pipelines"):
                bad.append((m, d))
            if under(m, "med3dvlm.models") and under(d, "med3dvlm.data", "med3dvlm.train", "med3dvlm.eval"):
                bad.append((m, d))
    assert not bad, bad


def test_model_math_imports_neither_ray_nor_deepspeed():
    for m, p in sources().items():
        if under(m, "med3dvlm.models"):
            assert not {i for i in imports(p) if under(i, "ray", "deepspeed")}, m


def test_no_import_cycle():
    g = graph()
    lib = {m: {d for d in deps if under(d, "med3dvlm")} for m, deps in g.items() if under(m, "med3dvlm")}
    # a package import (med3dvlm.io) stands for its __init__, which may re-export its submodules: not a cycle
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in lib.get(m, ()):
            if state.get(d) == 1 and not under(m, d):
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(lib):
        if m not in state:
            visit(m)
    assert not cycles, cycles


def test_entry_points_are_thin_and_library_functions_short():
    for f in (ROOT / "pipelines").glob("*.py"):
        assert len(f.read_text().splitlines()) < 80, f"{f.name} has grown past 80 lines: move the logic to the library"
    long = []
    for m, p in sources().items():
        if not under(m, "med3dvlm"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert not long, long


def test_library_imports_without_starting_ray():
    mods = [m for m in sources() if under(m, "med3dvlm") and not m.endswith("__main__")]
    code = ("import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in sorted(mods))
            + "import ray\nassert not ray.is_initialized()\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_preprocessing_workers_never_import_torch():
    """A shard task imports `data.shards` alone; torch would add seconds to every worker's start (issue 19)."""
    code = "import sys, med3dvlm.data.shards, med3dvlm.data.preprocess\nprint('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.stdout.strip() == "False", r.stderr[-2000:]
