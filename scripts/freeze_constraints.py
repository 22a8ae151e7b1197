"""Write constraints.txt: every package the requirement files bring in, at the version installed here.

    python scripts/freeze_constraints.py requirements.txt requirements-ray.txt > constraints.txt

The requirement files pin what labelsmart imports; the packages those pull in are open-ended, so a new release of one
of them can break a fresh install (as sentry-sdk 3 broke Label Studio's environment). ``requirements.txt`` takes this
file as constraints (``-c constraints.txt``), so an install gets the versions the suite last passed with. Run it in
an environment where the suite passes, after changing a requirement file. Only the requirements' closure is written
(by their ``Requires-Dist``, markers and extras evaluated here), not whatever else the environment holds.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def top_level(path: Path) -> list[Requirement]:
    """The requirements of a file, following ``-r`` includes; ``-c`` lines and comments are skipped."""
    out: list[Requirement] = []
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-c"):
            continue
        if line.startswith("-r"):
            out += top_level(path.parent / line[2:].strip())
        else:
            out.append(Requirement(line))
    return out


def closure(roots: list[Requirement]) -> dict[str, str]:
    """``{canonical name: installed version}`` of the roots and everything they require, here."""
    seen: dict[str, str] = {}
    todo = [(r, frozenset(r.extras)) for r in roots]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        req, extras = todo.pop()
        key = (canonicalize_name(req.name), extras)
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed here; install the requirement files first.")
        seen[key[0]] = dist.version
        for spec in dist.requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((sub, frozenset(sub.extras)))
    return seen


def main(paths: list[str]) -> None:
    pins = closure([r for p in paths for r in top_level(Path(p))])
    print("# Every package the requirement files bring in, at the version the suite passed with;")
    print("# made by scripts/freeze_constraints.py (run it again after changing a requirement file).")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main(sys.argv[1:])
