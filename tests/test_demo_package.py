"""The demo runs from an installed package: its configs are package data and every step is a
``python -m ofer...`` command that names no file outside the package and the demo folder."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import yaml

import ofer
import ofer.demo as demo

PKG = Path(ofer.__file__).resolve().parent


def test_demo_configs_are_package_resources():
    assert demo.CONFIG_KINDS == ("idgen", "expgen", "idrank", "sample")
    for kind in demo.CONFIG_KINDS:
        res = demo.config_file(kind)
        assert res.is_file()
        cfg = yaml.safe_load(res.read_text())
        assert isinstance(cfg, dict) and "data_root" in cfg
        with resources.as_file(res) as path:
            assert path.resolve().is_relative_to(PKG)
    with pytest.raises(ValueError, match="no demo config 'nope'"):
        demo.config_file("nope")


def test_pyproject_ships_every_demo_config():
    tomllib = pytest.importorskip("tomllib")
    pyproject = PKG.parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    data = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]
    folder = PKG / "world"
    files = {p.relative_to(folder).as_posix() for p in (folder / "configs").rglob("*") if p.is_file()}
    shipped = {f for f in files if any(fnmatch.fnmatch(f, g) for g in data.get("ofer.world", []))}
    assert files and shipped == files


def test_demo_steps_are_module_commands_on_package_files(tmp_path, monkeypatch):

    calls: list[tuple[list[str], dict]] = []

    class Finished:
        def poll(self) -> int:
            return 0

    def fake_run(cmd, **kw):
        calls.append((list(cmd), kw))
        return subprocess.CompletedProcess(cmd, 0)

    def fake_popen(cmd, **kw):
        calls.append((list(cmd), kw))
        return Finished()

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    monkeypatch.setattr(demo.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(demo, "world_report", lambda samples, world: {"samples": str(samples)})
    monkeypatch.setattr(demo, "format_report", lambda rep: "report\n")
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--root", "out/demo"]) == 0

    root = tmp_path / "out" / "demo"  # a relative --root is taken from the current directory
    assert (root / "report.md").read_text() == "report\n"
    assert [c[:3] for c, _ in calls] == [[sys.executable, "-m", m] for m in
                                         ("ofer.world", "ofer.train", "ofer.train", "ofer.train", "ofer.sample")]
    assert sorted(c[3] for c, _ in calls[1:4]) == ["expgen", "idgen", "idrank"]
    configs = []
    for cmd, kw in calls:
        assert "cwd" not in kw
        for arg in cmd[3:]:
            value = arg.split("=", 1)[-1]
            if os.sep in value or value.endswith((".yaml", ".py")):
                p = Path(value)
                assert p.is_absolute() and (p.is_relative_to(root) or p.is_relative_to(PKG)), arg
        configs.append(Path(cmd[cmd.index("--config") + 1]) if "--config" in cmd else None)
    assert configs[0] is None
    assert {c.name for c in configs[1:]} == {f"{k}.yaml" for k in demo.CONFIG_KINDS}
    assert all(c.is_relative_to(PKG / "world" / "configs") for c in configs[1:])


def test_demo_help_runs_outside_the_checkout(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PKG.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "ofer.demo", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--root" in r.stdout and "--fresh" in r.stdout
