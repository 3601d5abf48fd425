import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_import_tinylab_pulls_no_plotting_or_widgets():
    code = (
        "import sys, tinylab, tinylab.adapter.attach, tinylab.adapter.file_format, tinylab.model.loading\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('plotly', 'ipywidgets', 'IPython', 'matplotlib'))\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_no_module_is_over_400_lines():
    """One file, one job: a module that outgrows 400 lines is doing two (the layout issue's limit)."""
    long = {str(p.relative_to(ROOT)): n for folder in ("tinylab", "widgets") for p in (ROOT / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}, long


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
