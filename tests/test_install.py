"""Install: the extras cover what each entry point needs, and a missing optional package ends with one line
naming the gems extra that installs it, at the boundary (before any training), never a bare
ModuleNotFoundError deep in a run. Missing packages are simulated with ``sys.modules[name] = None`` (import
then raises ModuleNotFoundError, as for a package that is not installed)."""
import re
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest

import gems
from gems.errors import MissingDependencyError
from gems.resources import OPTIONAL, install_command, require

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """Normalised distribution name of a requirement string ("galore-torch==1.0" -> "galore-torch")."""
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _extras() -> dict[str, set[str]]:
    """pyproject's extras, each as the set of distributions it installs (self-references "gems[a,b]" expanded)."""
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def expand(extra: str) -> set[str]:
        out: set[str] = set()
        for req in raw[extra]:
            m = re.fullmatch(r"gems\[([^\]]+)\]", req.strip())
            if m:
                for sub in m.group(1).split(","):
                    out |= expand(sub.strip())
            else:
                out.add(_name(req))
        return out

    return {extra: expand(extra) for extra in raw}


def _block(monkeypatch, *modules: str) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def _stub(monkeypatch, *modules: str) -> None:
    """Importable stand-ins (the check only imports them), so these tests need none of the real packages."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, types.ModuleType(module))


def _assert_names_extra(exc: BaseException, dist: str, extra: str) -> str:
    msg = str(exc)
    assert "\n" not in msg
    assert dist in msg and f"'{extra}'" in msg
    assert msg.endswith(f"run: {install_command(extra)}") and f'[{extra}]"' in msg and "pip install -e" in msg
    return msg


# ------------------------------------------------------------------------------------------ the helper
@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_require_names_the_extra(monkeypatch, module):
    _block(monkeypatch, module)
    with pytest.raises(MissingDependencyError) as info:
        require(module, "feature X")
    dist, extra = OPTIONAL[module]
    msg = _assert_names_extra(info.value, dist, extra)
    assert "feature X" in msg and "is not installed" in msg
    assert isinstance(info.value, ImportError) and info.value.name == module  # `except ImportError` catches it


def test_install_command_from_the_checkout(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert install_command("hf") == 'pip install -e ".[hf]"'
    monkeypatch.chdir(tmp_path)
    assert install_command("hf") == f'pip install -e "{ROOT}[hf]"'


def test_broken_install_says_what_failed(monkeypatch, tmp_path):
    """A package that is there but whose own import fails (galore-torch without bitsandbytes) says so."""
    pkg = tmp_path / "gems_test_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import gems_test_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(OPTIONAL, "gems_test_broken_pkg", ("gems-test-broken", "galore"))
    with pytest.raises(MissingDependencyError) as info:
        require("gems_test_broken_pkg", "feature X")
    msg = _assert_names_extra(info.value, "gems-test-broken", "galore")
    assert "cannot be imported (No module named 'gems_test_absent_dependency')" in msg


def test_unknown_module_is_a_programming_error():
    with pytest.raises(KeyError, match="OPTIONAL"):
        require("numpy_or_anything_else", "feature X")


# ------------------------------------------------------------------------------------------ the extras
def test_optional_packages_are_in_their_extras():
    extras = _extras()
    for module, (dist, extra) in OPTIONAL.items():
        assert dist in extras[extra], f"{module}: {dist} is not in the '{extra}' extra of pyproject.toml"
    # the main job's default and smoke presets, and GemsTrainer, from the hf extra alone
    assert {"transformers", "peft", "accelerate", "gguf", "tqdm"} <= extras["hf"]
    assert {"transformers", "peft", "galore-torch", "bitsandbytes", "apollo-torch"} <= extras["bench"]
    # the tests import every optional package
    assert {dist for dist, _ in OPTIONAL.values()} | {"pytest", "pybind11"} <= extras["test"]


def test_ci_pins_every_extra():
    """CI installs requirements/ci.txt, not the extras: every package an extra names is pinned there."""
    pinned = {_name(line) for line in (ROOT / "requirements" / "ci.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    for extra, dists in _extras().items():
        assert dists <= pinned, f"extra '{extra}': {sorted(dists - pinned)} not pinned in requirements/ci.txt"


def test_base_dependencies_are_imported():
    """Every base dependency is imported by the package (einops was declared and never imported)."""
    deps = [_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    source = "\n".join(p.read_text() for d in ("python/gems", "gems_kernels") for p in (ROOT / d).rglob("*.py"))
    for dist in deps:
        module = dist.replace("-", "_")
        assert re.search(rf"^\s*(import|from) {module}\b", source, re.M), f"{dist} is declared but never imported"


def test_import_gems_needs_no_optional_package():
    """The base install: gems and the recipe modules import with every optional package missing."""
    code = ("import sys\n"
            f"sys.modules.update(dict.fromkeys({sorted(OPTIONAL)!r}))\n"
            "import gems, gems.recipes.unified_sr, gems.recipes.plots, gems.recipes.model, gems.recipes.report\n"
            "import gems_kernels\n"
            "try:\n"
            "    import gems.integrations.transformers\n"
            "except ImportError as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("MissingDependencyError transformers is not installed") and "[hf]" in out.stdout


# ------------------------------------------------------------------------------------------ the boundaries
def test_recipe_checks_method_packages_before_any_work(monkeypatch, capsys):
    from gems.recipes import unified_sr

    _stub(monkeypatch, "transformers", "tqdm")
    _block(monkeypatch, "peft")

    def no_work(*args, **kwargs):
        raise AssertionError("the run started before its dependencies were checked")

    monkeypatch.setattr(unified_sr.D, "load_interactions", no_work)
    code = unified_sr.main(["--preset", "smoke", "--methods", "adamw,lora,gems", "--no-plots", "--out", "unused"])
    err = capsys.readouterr().err
    assert code == 2
    line, = err.strip().splitlines()
    assert line.startswith("error: peft is not installed, needed by method 'lora' of python -m gems.recipes.unified_sr")
    _assert_names_extra(Exception(line), "peft", "hf")


@pytest.mark.parametrize("module, dist, extra, methods, names", [
    ("transformers", "transformers", "hf", "adamw", "python -m gems.recipes.unified_sr"),
    ("tqdm", "tqdm", "hf", "adamw", "python -m gems.recipes.unified_sr"),
    ("galore_torch", "galore-torch", "galore", "adamw,galore,galore_ns", "methods 'galore', 'galore_ns'"),
])
def test_recipe_dependency_check(monkeypatch, module, dist, extra, methods, names):
    from gems.recipes import unified_sr

    _stub(monkeypatch, *({"transformers", "tqdm", "galore_torch"} - {module}))
    _block(monkeypatch, module)
    cfg = unified_sr.parse_args(["--preset", "smoke", "--methods", methods, "--no-plots"])
    with pytest.raises(MissingDependencyError) as info:
        unified_sr.check_dependencies(cfg)
    assert names in _assert_names_extra(info.value, dist, extra)


def test_recipe_skips_plots_without_matplotlib(monkeypatch, capsys):
    from gems.recipes import unified_sr

    _stub(monkeypatch, "transformers", "tqdm")
    _block(monkeypatch, "matplotlib")
    cfg = unified_sr.parse_args(["--preset", "smoke"])
    assert cfg.plots
    unified_sr.check_dependencies(cfg)
    assert not cfg.plots  # write_outputs then writes no PNG
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("plots skipped: matplotlib is not installed")
    assert f"run: {install_command('plot')} to enable them" in line and "--no-plots" in line

    cfg = unified_sr.parse_args(["--preset", "smoke", "--no-plots"])
    unified_sr.check_dependencies(cfg)
    assert capsys.readouterr().err == ""


def test_plots_name_the_extra(monkeypatch, tmp_path):
    from gems.recipes.plots import plot_validation

    _block(monkeypatch, "matplotlib")
    with pytest.raises(MissingDependencyError) as info:
        plot_validation({}, str(tmp_path / "x.png"))
    _assert_names_extra(info.value, "matplotlib", "plot")


@pytest.mark.parametrize("method, module, dist, extra", [("lora", "peft", "peft", "hf"),
                                                         ("galore", "galore_torch", "galore-torch", "galore")])
def test_build_method_names_the_extra(monkeypatch, method, module, dist, extra):
    """Checked before the model is touched (model=None here)."""
    from gems.recipes.methods import Hyper, build_method

    _block(monkeypatch, module)
    with pytest.raises(MissingDependencyError) as info:
        build_method(method, None, [0], 1e-3, Hyper(item_lr=1e-3))
    assert f"method '{method}'" in _assert_names_extra(info.value, dist, extra)


def test_model_loading_names_the_extra(monkeypatch, tmp_path):
    from gems.recipes import model

    _block(monkeypatch, "transformers")
    (tmp_path / "config.json").write_text("{}")  # a model directory, so only the package is missing
    with pytest.raises(MissingDependencyError) as info:
        model.load_model_and_tokenizer(str(tmp_path))
    _assert_names_extra(info.value, "transformers", "hf")
    with pytest.raises(MissingDependencyError):
        model.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("module", ["gguf", "accelerate"])
def test_gguf_conversion_names_the_extra(monkeypatch, tmp_path, module):
    from gems.recipes import model

    _stub(monkeypatch, "transformers", *({"gguf", "accelerate"} - {module}))
    sys.modules["transformers"].AutoModelForCausalLM = sys.modules["transformers"].AutoTokenizer = None
    _block(monkeypatch, module)
    with pytest.raises(MissingDependencyError) as info:
        model._convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "cache"))
    assert "loading a GGUF model" in _assert_names_extra(info.value, module, "hf")


def test_trainer_integration_names_the_extra(monkeypatch):
    import importlib

    _block(monkeypatch, "transformers")
    monkeypatch.delitem(sys.modules, "gems.integrations.transformers", raising=False)
    with pytest.raises(ImportError) as info:  # the usual `except ImportError` around an optional import
        importlib.import_module("gems.integrations.transformers")
    assert isinstance(info.value, MissingDependencyError)
    assert "GemsTrainer" in _assert_names_extra(info.value, "transformers", "hf")


def test_error_is_exported():
    assert gems.MissingDependencyError is MissingDependencyError and issubclass(MissingDependencyError, gems.GemsError)
