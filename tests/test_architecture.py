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
    for f in [*(ROOT / "pipelines").glob("*.py"), *(ROOT / "tuning").glob("*.py")]:
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


def _stage_branches(source: str) -> list[int]:
    """Lines that compare a stage number (`stage`, `x.stage`, `stage.number`) with a literal: `stage == 1`,
    `stage > 1`, `stage in (2, 3)`."""
    def is_stage(n) -> bool:
        return (isinstance(n, ast.Name) and n.id == "stage") or (isinstance(n, ast.Attribute) and n.attr == "stage") \
            or (isinstance(n, ast.Attribute) and n.attr == "number" and isinstance(n.value, ast.Name)
                and n.value.id == "stage")

    def is_literal(n) -> bool:
        return isinstance(n, ast.Constant) and isinstance(n.value, int) or isinstance(n, (ast.Tuple, ast.List, ast.Set))

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_stage(s) for s in sides) and any(is_literal(s) for s in sides):
                lines.append(node.lineno)
    return lines


def test_the_stage_number_is_branched_on_only_in_its_home():
    """What differs between stages lives in `train/stages.py` (one object per stage); elsewhere the code asks the
    stage object, so a stage variant is one new object rather than an edit in every file."""
    home = LIB / "med3dvlm" / "train" / "stages.py"
    found = {f"{p.relative_to(ROOT)}:{n}" for m, p in sources().items()
             if under(m, "med3dvlm", "pipelines", "serve", "tuning") and p != home
             for n in _stage_branches(p.read_text())}
    assert not found, found
    probe = "if stage == 3: pass\nif x.stage in (2, 3): pass\nif zero_stage == 3: pass\nif cfg.train.zero_stage > 1: pass"
    assert _stage_branches(probe) == [1, 2]  # the rule bites, and ZeRO's stage is not a training stage


def test_no_file_in_train_is_over_200_lines():
    """The loop reads as a story; the engine, metrics, validation and checkpoints are components of their own."""
    long = {f.name: n for f in (LIB / "med3dvlm" / "train").glob("*.py")
            if (n := len(f.read_text().splitlines())) > 200}
    assert not long, long


def _task_branches(source: str) -> list[int]:
    """Lines that compare a task name (`task`, `x.task`) with a string: `ec.task == "report"`, `task in (...)`."""
    def is_task(n) -> bool:
        return (isinstance(n, ast.Name) and n.id == "task") or (isinstance(n, ast.Attribute) and n.attr == "task")

    def is_text(n) -> bool:
        return isinstance(n, ast.Constant) and isinstance(n.value, str) or isinstance(n, (ast.Tuple, ast.List, ast.Set))

    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Compare)
            and any(is_task(s) for s in [node.left, *node.comparators])
            and any(is_text(s) for s in [node.left, *node.comparators])]


def test_the_evaluation_task_is_branched_on_only_in_its_own_file():
    """Each M3D-Bench task is one file under `eval/tasks/` behind one interface, picked by name: the runner, the
    predictors and the results ask the task object, so a new task is one new file."""
    home = LIB / "med3dvlm" / "eval" / "tasks"
    found = {f"{p.relative_to(ROOT)}:{n}" for m, p in sources().items()
             if under(m, "med3dvlm", "pipelines", "serve", "tuning") and home not in p.parents
             for n in _task_branches(p.read_text())}
    assert not found, found
    assert _task_branches('if ec.task == "report": pass\nif task in ("a",): pass\nif mask == "x": pass') == [1, 2]


def test_every_task_has_its_file_and_its_name():
    from med3dvlm.eval.tasks import TASKS

    files = {f.stem for f in (LIB / "med3dvlm" / "eval" / "tasks").glob("*.py")} - {"__init__", "base"}
    assert {name.replace("-", "_") for name in TASKS} == files


def test_one_settings_loader():
    """Settings are read in one place (`med3dvlm/settings.py`: YAML, overrides, types, bounds, choices): no other file
    parses YAML into settings, checks a number by hand or builds a parser flag by flag for a settings dataclass; the
    training config, evaluation, the Serve app and the sweep each declare their settings as `setting` fields."""
    import dataclasses

    from med3dvlm.config import Config
    from med3dvlm.eval.runner import EvalConfig
    from med3dvlm.sweep import SweepConfig
    from serve.app import AppArgs, build_app

    home = LIB / "med3dvlm" / "settings.py"
    offenders = []
    for m, p in sources().items():
        if p == home or under(m, "bench"):
            continue
        text = p.read_text()
        for words in ("yaml.safe_load(", "number_ok(", "get_type_hints("):
            if words in text:
                offenders.append(f"{m}: {words}")
    assert not offenders, offenders
    for cls in (Config, EvalConfig, SweepConfig, AppArgs.model_fields["settings"].annotation):
        assert all("help" in f.metadata for f in dataclasses.fields(cls) if f.init), cls
    # Serve's typed application builder: the builder's argument is the model Serve validates
    import inspect

    assert inspect.signature(build_app).parameters["args"].annotation in (AppArgs, "AppArgs")
    for entry in ("pipelines/evaluate.py", "tuning/siglip_sweep.py"):
        assert ".add_argument(\"--" not in (ROOT / entry).read_text().split("add_flags(")[1], entry
