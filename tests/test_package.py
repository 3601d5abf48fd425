import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_tinylab_pulls_no_plotting_or_widgets():
    code = (
        "import sys, tinylab, tinylab.adapter, tinylab.adapter_file, tinylab.models\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('plotly', 'ipywidgets', 'IPython', 'matplotlib'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_library_has_no_print_pickle_eval_or_unsafe_torch_load():
    for path in (ROOT / "tinylab").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "cloudpickle", "dill") for n in names), path
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name):  # builtins only: model.eval() is fine
                    assert f.id not in ("print", "eval", "exec", "__import__"), f"{path}:{node.lineno} calls {f.id}"
                name = f.attr if isinstance(f, ast.Attribute) else ""
                if name == "load" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, (
                        f"{path}:{node.lineno} torch.load without weights_only=True")


def test_no_submodule_shadows_a_public_name():
    """`tinylab.evaluate` and `tinylab.sweep` are functions: importing every submodule (which sets
    `tinylab.<module>` on the package) must not replace a public name with a module."""
    import importlib
    import pkgutil
    import types

    import tinylab

    bound = {name: getattr(tinylab, name) for name in tinylab.__all__}
    for info in pkgutil.walk_packages(tinylab.__path__, "tinylab."):
        if info.name.startswith("tinylab.widgets"):
            continue
        importlib.import_module(info.name)
    shadowed = sorted(name for name, obj in bound.items()
                      if getattr(tinylab, name) is not obj or isinstance(getattr(tinylab, name), types.ModuleType)
                      and not isinstance(obj, types.ModuleType))
    assert shadowed == []
    modules = {info.name for info in pkgutil.iter_modules(tinylab.__path__)}
    assert sorted(modules & {n for n, o in bound.items() if not isinstance(o, types.ModuleType)}) == []
