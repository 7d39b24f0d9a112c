"""The committed dvc.lock must describe the committed code: if a stage's code changed and
nobody re-ran `dvc repro`, a fresh clone's data would silently differ from its lineage."""

import hashlib

import yaml
from helpers import REPO_ROOT as REPO


def test_every_code_dependency_in_dvc_lock_matches_the_working_tree():
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    checked = 0
    for name, stage in lock["stages"].items():
        for dep in stage.get("deps", []):
            path = REPO / dep["path"]
            if dep["path"].startswith("data/"):
                continue  # data deps are other stages' outputs, pinned by their own entries
            actual = hashlib.md5(path.read_bytes()).hexdigest()
            assert actual == dep["md5"], (
                f"dvc.lock: stage {name!r} pins {dep['path']} at md5 {dep['md5']}, but the file "
                f"now has md5 {actual}: run `dvc repro` and commit dvc.lock"
            )
            checked += 1
    assert checked >= 5
