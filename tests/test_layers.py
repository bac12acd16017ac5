"""The import graph runs one way (DESIGN.md §2): read from the code's own imports with `ast`,
imports inside functions included, every project module imports only modules of the layers
below it, so there is no circle and no arrow running up."""
import ast
import os

from conftest import ROOT

# lowest first; a module may import only modules listed before it
LAYERS = [
    'runtime', 'config', 'cpu_kernels', 'mixup', 'utils', 'classnames',  # base
    'safepickle', 'torchfile', 'paddlefile', 'matfile',                   # file formats
    'transformer', 'segmentation',                                        # models
    'randaugment', 'transforms', 'seg_transforms',                        # transforms
    'datasets', 'shards', 'parquet_data', 'seg_data', 'sources',          # data
    'checkpoint', 'optim', 'seg_inference',                               # files, optimiser
    'tasks', 'engine', 'cli',                                             # stages
]
# the top: scripts, importing any module above, imported by none
SCRIPT_DIRS = ('tools', 'port_weights')


def modules():
    """name -> path of every project module (the root's .py files)."""
    return {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith('.py')}


def project_imports(path, names):
    """-> {imported project module: first line} for a file, function-level imports included."""
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name.split('.')[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module.split('.')[0]]
        else:
            continue
        for t in targets:
            if t in names:
                found.setdefault(t, node.lineno)
    return found


def is_script(name):
    return name.startswith('main_multi_gpu_') or name == 'hubconf'


def test_every_module_has_a_layer():
    libs = {n for n in modules() if not is_script(n)}
    assert libs == set(LAYERS), ('modules without a layer: '
                                 f'{sorted(libs - set(LAYERS))}; layers without a module: '
                                 f'{sorted(set(LAYERS) - libs)}')


def test_imports_run_down_the_layers_only():
    mods = modules()
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = []
    for name in LAYERS:
        for target, line in project_imports(mods[name], mods).items():
            if target == name:
                continue
            if target not in rank or rank[target] >= rank[name]:
                upward.append(f'{name}.py:{line} imports {target}')
    assert not upward, 'imports that run up: ' + '; '.join(upward)


def test_no_import_cycle_anywhere():
    """Over every file, scripts and tools included: the graph is acyclic (a depth-first search
    finds no back edge)."""
    mods = modules()
    files = dict(mods)
    for d in SCRIPT_DIRS:
        for f in os.listdir(os.path.join(ROOT, d)):
            if f.endswith('.py'):
                files[f'{d}/{f[:-3]}'] = os.path.join(ROOT, d, f)
    graph = {n: set(project_imports(p, mods)) - {n} for n, p in files.items()}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 'open'
        for t in sorted(graph.get(n, ())):
            if state.get(t) == 'open':
                cycles.append(' -> '.join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[n] = 'done'

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, 'import cycles: ' + '; '.join(cycles)
    scripts = {n for n in files if is_script(n) or '/' in n}
    imported = {t for n in mods if n not in scripts for t in graph[n]}
    assert not imported & scripts, f'scripts imported by modules: {sorted(imported & scripts)}'


def test_the_check_sees_a_lazy_upward_import(tmp_path):
    """The reader finds an import inside a function, which is how arrows ran up."""
    path = tmp_path / 'low.py'
    path.write_text('def f():\n    import tasks\n    return tasks\n')
    assert project_imports(str(path), {'tasks': '', 'low': ''}) == {'tasks': 2}
