"""The distribution: a regular (non-editable) wheel carries every subpackage
under the specmoe namespace, and imports point one way down the layers."""

import ast
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAYERS = {"kernels": 0, "experts": 1, "drafter": 2, "router": 3, "cluster": 4}


@pytest.mark.slow
def test_regular_wheel_installs_the_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("specmoe-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    for pkg in ("specmoe", *(f"specmoe/{p}" for p in LAYERS), "specmoe/experts/families"):
        assert (site / pkg / "__init__.py").exists(), f"{pkg} missing from {wheel.name}"
    assert not (site / "kernels").exists(), "bare top-level names must not be installed"
    for model in ("tiny-moe", "tiny-draft"):
        for f in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (site / "specmoe/experts/bundled" / model / f).exists(), f"bundled {model}/{f} missing"
    code = ("import specmoe, specmoe.experts.families.deepseek_v3, specmoe.cluster.cli; "
            "from specmoe import Engine, SamplingParams; from specmoe.experts.checkpoint import bundled_model; "
            "print(specmoe.__file__); print(bundled_model())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site)), r.stdout


def test_imports_point_down_the_layers_and_runtime_never_imports_transformers():
    bad = []
    for pkg, rank in LAYERS.items():
        for f in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: resolve against the package path
                        rel = f.relative_to(ROOT).parts[:-1]
                        base = list(rel[: len(rel) - node.level + 1])
                        names = [".".join(base + ([node.module] if node.module else []))]
                    else:
                        names = [node.module or ""]
                else:
                    continue
                for n in names:
                    parts = n.split(".")
                    if parts[0] == "specmoe":
                        parts = parts[1:]
                    if parts and parts[0] in LAYERS and LAYERS[parts[0]] > rank:
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} imports {n}")
                    if parts and parts[0] == "transformers":
                        bad.append(f"{f.relative_to(ROOT)}:{node.lineno} imports transformers")
    assert not bad, "\n".join(bad)
