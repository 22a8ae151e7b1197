"""The install is reproducible: what the requirement files bring in is pinned in constraints.txt, at the version the
suite runs with (a new release of an unpinned package broke a fresh install once: sentry-sdk 3, RELIABILITY.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _freeze():
    spec = importlib.util.spec_from_file_location("freeze_constraints", ROOT / "scripts" / "freeze_constraints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[name] = version
    return pins


def test_constraints_pin_every_installed_package_the_requirements_bring_in():
    freeze = _freeze()
    files = [ROOT / "requirements.txt"]
    if importlib.util.find_spec("ray") is not None:  # the optional extra, installed by .ci/run
        files.append(ROOT / "requirements-ray.txt")
    installed = freeze.closure([r for f in files for r in freeze.top_level(f)])
    pins = _pins(ROOT / "constraints.txt")
    assert "torch" in installed and "starlette" in installed  # a top-level pin and one only pulled in (by fastapi)
    unpinned = sorted(set(installed) - set(pins))
    other = {n: (v, pins[n]) for n, v in installed.items() if n in pins and pins[n] != v}
    assert not unpinned, f"not in constraints.txt: {unpinned}; write it again (scripts/freeze_constraints.py)"
    assert not other, f"installed vs constraints.txt: {other}; write it again (scripts/freeze_constraints.py)"


def test_requirements_read_the_constraints_and_agree_with_them():
    text = (ROOT / "requirements.txt").read_text().splitlines()
    assert "-c constraints.txt" in text
    pins = _pins(ROOT / "constraints.txt")
    freeze = _freeze()
    for f in ("requirements.txt", "requirements-ray.txt"):
        for r in freeze.top_level(ROOT / f):
            (spec,) = r.specifier  # every top-level requirement is pinned with ==
            assert spec.operator == "==", f"{f}: {r} is not pinned"
            pinned = pins.get(canonicalize_name(r.name))
            assert pinned == spec.version, f"{f}: {r} but constraints.txt has {pinned}"


@pytest.mark.parametrize("name", ["labelstudio", "datumaro"])
def test_the_tool_environments_are_pinned_whole(name: str):
    pins = _pins(ROOT / "scripts" / "interop" / f"{name}.txt")
    script = (ROOT / "scripts" / "interop_envs.sh").read_text()
    requirement = {"labelstudio": "label-studio", "datumaro": "datumaro"}[name]
    assert f"make_env {name} {requirement}=={pins[requirement]}" in script
    assert len(pins) > 10  # the whole environment, not only the tool
