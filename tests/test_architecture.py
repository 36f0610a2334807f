"""The layering as a test: every module's imports (read with ast, those inside functions included) against the
layers of docs/architecture.md. Fails on an import circle, on an import from a lower layer to a higher one, on
zoo importing evals or benchmarks, on a private name imported from another package, and on a path or block
family the architecture page names that the tree does not hold (or the reverse)."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "evals", "benchmarks")

# Lowest first: a module may import its own layer and those below. Matched by longest prefix.
LAYERS = [
    ("ops and data", ("zoo.ops", "zoo.data")),
    ("distributed", ("zoo.distributed",)),
    ("blocks", ("zoo.registry", "zoo.blocks")),
    ("config", ("zoo.config",)),
    ("layer", ("zoo.layer",)),
    ("memory", ("zoo.memory",)),
    ("model", ("zoo.model",)),
    ("hf / convert / sizing", ("zoo.hf", "zoo.convert", "zoo.sizing")),
    ("train", ("zoo.train",)),
    ("the zoo package", ("zoo",)),
    ("commands", ("zoo.commands", "zoo.cli")),
    ("evals", ("evals",)),
    ("evaluation commands and benchmarks", ("evals.commands", "benchmarks")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _known(name: str):
    """The module of ours `name` is or lies in (a name imported from a module: the module), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str):
    """(imported module, name or None, line) for every import statement of `module`, at any depth."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _known(alias.name):
                    yield _known(alias.name), None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                target = _known(f"{base}.{alias.name}") if f"{base}.{alias.name}" in MODULES else _known(base)
                if target:
                    yield target, (None if f"{base}.{alias.name}" in MODULES else alias.name), node.lineno


GRAPH = {m: [(t, n, line) for t, n, line in _imports(m) if t != m] for m in MODULES}


def layer_of(module: str) -> int:
    best = max(((len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module}: in no layer of tests/test_architecture.py (add it to LAYERS and the docs)"
    return best[1]


def _package(module: str) -> str:
    path = MODULES.get(module)
    return module if path is not None and path.name == "__init__.py" else module.rpartition(".")[0]


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def upward(graph) -> list:
    return [f"{m}:{line} imports {t} ({LAYERS[layer_of(t)][0]} above {LAYERS[layer_of(m)][0]})"
            for m, edges in graph.items() for t, _, line in edges if layer_of(t) > layer_of(m)]


def circles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _, _ in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def private_imports(graph) -> list:
    return [f"{m}:{line} imports {t}.{name}" for m, edges in graph.items() for t, name, line in edges
            if name and name.startswith("_") and not name.startswith("__") and _package(m) != _package(t)]


def test_no_import_goes_up_a_layer():
    bad = upward(GRAPH)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_zoo_never_imports_evals_or_benchmarks():
    bad = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items() if m.split(".")[0] == "zoo"
           for t, _, line in edges if t.split(".")[0] != "zoo"]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    assert not circles(GRAPH), f"import circles: {circles(GRAPH)}"


def test_no_private_name_imported_across_packages():
    bad = private_imports(GRAPH)
    assert not bad, "private names imported from another package (make them public there):\n" + "\n".join(bad)


def test_the_checks_catch_what_they_must():
    """On a made-up graph: an op importing the model (upward, and a circle with the model importing it back)
    and a private name taken from another package."""
    fake = {"zoo.ops.probe": [("zoo.model", None, 3)], "zoo.model": [("zoo.ops.probe", "_secret", 5)]}
    assert upward(fake) == ["zoo.ops.probe:3 imports zoo.model (model above ops and data)"]
    assert circles(fake) == [["zoo.model", "zoo.ops.probe"]]
    assert private_imports(fake) == ["zoo.model:5 imports zoo.ops.probe._secret"]
    assert private_imports({"zoo.blocks.mamba.cp": [("zoo.blocks.mamba.block", "_x", 1)]}) == []   # one package


def test_the_checker_sees_what_it_must():
    """The import reader itself: relative, in-function and from-package imports are all edges."""
    edges = {(t, n) for t, n, _ in GRAPH["zoo.blocks.taipan.cp"]}
    assert ("zoo.ops.taipan", "selective_window_attention") in edges
    assert any(t == "zoo.ops.triton.ssd" for t, _, _ in GRAPH["zoo.ops.ssd"])    # imported inside a function
    assert any(t == "zoo.blocks.attention" for t, _, _ in GRAPH["zoo.blocks.infini.block"])
    assert layer_of("zoo.ops.triton.ssd") == 0 and layer_of("zoo") < layer_of("zoo.commands.train")
    assert layer_of("evals.commands.compare") > layer_of("evals.engine")


DOC = ROOT / "docs" / "architecture.md"


def test_the_architecture_page_matches_the_tree():
    text = DOC.read_text()
    named = set(re.findall(r"`((?:zoo|evals|benchmarks|tests|scripts|recipes|docs)/[\w/.<>-]*)`", text))
    missing = [p for p in named if "<" not in p and not (ROOT / p.rstrip("/")).exists()]
    assert not missing, f"docs/architecture.md names paths the tree does not hold: {sorted(missing)}"
    families = sorted(p.name for p in (ROOT / "zoo" / "blocks").iterdir() if p.is_dir() and not p.name.startswith("_"))
    listed = re.search(r"A family lives in its own folder \(([^)]*)\)", text)
    assert listed, "docs/architecture.md: the sentence listing the block families is gone"
    assert sorted(re.findall(r"\w+", listed.group(1))) == families, (
        f"docs/architecture.md lists the families {listed.group(1)}; zoo/blocks holds {', '.join(families)}")
    for name, _ in LAYERS:
        assert name in text, f"docs/architecture.md: layer {name!r} of tests/test_architecture.py is not described"
