"""The layout the README draws is the layout the code has: who imports whom (checked from the
source, lazy imports inside functions included), no cycles, and the split points of STYLE.md
(a file past ~450 lines or a function past ~80 is split before it grows further)."""
import ast
import re

from conftest import ROOT

MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
FREE = {"demo", "protocol"}        # drivers of the whole chain: may import any script


def modules():
    return {p.stem for p in ROOT.glob("*.py")}


def imports_of(name, project):
    """Project modules that `name`.py imports anywhere (top level or inside a function)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module.split(".")[0])
    return (out & project) - {name}


def readme_graph():
    """{module: allowed imports} from the README's "Who imports whom" block; None = unconstrained."""
    text = (ROOT / "README.md").read_text()
    block = text.split("Who imports whom", 1)[1].split("```", 2)[1]
    graph = {}
    for line in block.strip().splitlines():
        left, right = (s.strip() for s in line.split("<-", 1))
        right = re.sub(r"\(.*?\)", "", right)          # remarks in brackets
        allowed = set() if right.startswith("nothing") else {m.strip() for m in right.split(",") if m.strip()}
        for m in (m.strip() for m in left.split(",")):
            graph[m] = allowed
    return graph


def test_readme_import_graph_is_true():
    project, graph = modules(), readme_graph()
    scripts = {m for m in project if m.startswith("bench_")} | FREE
    missing = sorted(project - scripts - set(graph))
    assert not missing, f"modules missing from the README's import graph: {missing}"
    unknown = sorted(set(graph) - project - {"bench_*"} - FREE)
    assert not unknown, f"the README's import graph names modules that do not exist: {unknown}"
    wrong = {m: sorted(imports_of(m, project) - graph[m]) for m in project - scripts}
    wrong = {m: w for m, w in wrong.items() if w}
    assert not wrong, f"imports the README's graph does not allow: {wrong}"


def test_no_import_cycles():
    project = modules()
    deps = {m: imports_of(m, project) for m in project}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(deps[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(project):
        visit(m, [])


def test_no_file_or_function_past_the_split_point():
    long_files, long_funcs = {}, {}
    for p in sorted(ROOT.glob("*.py")):
        text = p.read_text()
        n = len(text.splitlines())
        if n > MAX_FILE_LINES:
            long_files[p.name] = n
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_funcs[f"{p.name}:{node.name}"] = length
    assert not long_files, f"files past {MAX_FILE_LINES} lines: {long_files}"
    assert not long_funcs, f"functions past {MAX_FUNCTION_LINES} lines: {long_funcs}"
