"""pyproject.toml states ranges that co-install; constraints.txt pins the tested set inside them."""

import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]


def project_requirements():
  """(where, Requirement) for the dependencies and every extra of pyproject.toml."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = [("dependencies", Requirement(r)) for r in project["dependencies"]]
  for extra, lines in project.get("optional-dependencies", {}).items():
    reqs += [(f"extra {extra!r}", Requirement(r)) for r in lines]
  return reqs


def constraint_pins():
  """{canonical name: Version} from constraints.txt; every line must be an exact pin."""
  pins = {}
  for line in (ROOT / "constraints.txt").read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    req = Requirement(line)
    (spec,) = req.specifier  # exactly one specifier per line
    assert spec.operator == "==" and "*" not in spec.version, f"not an exact pin: {line!r}"
    name = canonicalize_name(req.name)
    assert name not in pins, f"{req.name} pinned twice in constraints.txt"
    pins[name] = Version(spec.version)
  return pins


def test_pyproject_has_no_exact_pins():
  pinned = [f"{where}: {req}" for where, req in project_requirements()
            if any(s.operator in ("==", "===") for s in req.specifier)]
  assert not pinned, f"exact pins in pyproject.toml (use lower bounds): {pinned}"


def test_every_dependency_has_a_lower_bound():
  unbounded = [f"{where}: {req}" for where, req in project_requirements()
               if not any(s.operator in (">=", ">", "~=") for s in req.specifier)]
  assert not unbounded, f"dependencies without a tested lower bound: {unbounded}"


def test_constraints_pin_every_direct_dependency_inside_its_range():
  pins = constraint_pins()
  missing, outside = [], []
  for where, req in project_requirements():
    version = pins.get(canonicalize_name(req.name))
    if version is None:
      missing.append(f"{where}: {req.name}")
    elif not req.specifier.contains(version, prereleases=True):
      outside.append(f"{where}: {req} but constraints.txt has {version}")
  assert not missing, f"direct dependencies missing from constraints.txt: {missing}"
  assert not outside, f"constraints.txt outside the pyproject.toml range: {outside}"

