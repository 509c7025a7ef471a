"""Check a Q8_0 file written by `qnode quantize` against an independent quantizer, block by block.

Usage: python3 tests/q8_0_reference.py SOURCE.gguf QNODE_OUTPUT.gguf

For every tensor of the output: a matrix the source stored in another type must equal Python
`gguf`'s own `quants.quantize(quants.dequantize(source), Q8_0)` (gguf==0.19.0, written to match
ggml's reference rounding) in every 34-byte block; a matrix already Q8_0 must be copied byte for
byte; a 1-D tensor must be the source's values as F32. Prints one summary line
`tensors N requantized R blocks B differing 0` and exits 0, or prints the first differing blocks
and exits 1. Explicit checks only (no `assert`, which `python3 -O` strips).
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, quants

BLOCK_BYTES = 34  # f16 scale + 32 int8


def fail(msg):
    print(msg)
    sys.exit(1)


def main():
    if len(sys.argv) != 3:
        fail("usage: q8_0_reference.py SOURCE.gguf OUTPUT.gguf")
    src = {t.name: t for t in GGUFReader(sys.argv[1]).tensors}
    out = GGUFReader(sys.argv[2]).tensors
    if len(out) != len(src):
        fail(f"output has {len(out)} tensors, source {len(src)}")
    requantized = blocks = differing = 0
    problems = []
    for t in out:
        s = src.get(t.name)
        if s is None:
            fail(f"{t.name}: not in the source")
        got = np.asarray(t.data)
        if t.tensor_type == T.F32:
            want = quants.dequantize(np.asarray(s.data), s.tensor_type).astype(np.float32)
            if want.size != got.size or not np.array_equal(want.reshape(-1), got.reshape(-1)):
                problems.append(f"{t.name}: F32 values differ from the source's")
            continue
        if t.tensor_type != T.Q8_0:
            fail(f"{t.name}: output type {t.tensor_type.name}, expected Q8_0 or F32")
        if s.tensor_type == T.Q8_0:
            want = np.asarray(s.data)
        else:
            f = quants.dequantize(np.asarray(s.data), s.tensor_type)
            want = quants.quantize(f, T.Q8_0)
            requantized += 1
        want = want.reshape(-1).view(np.uint8).reshape(-1, BLOCK_BYTES)
        got = got.reshape(-1).view(np.uint8).reshape(-1, BLOCK_BYTES)
        if want.shape != got.shape:
            fail(f"{t.name}: {got.shape[0]} blocks, reference {want.shape[0]}")
        blocks += want.shape[0]
        bad = np.nonzero((want != got).any(axis=1))[0]
        differing += len(bad)
        for b in bad[:3]:
            wd = want[b, :2].view(np.float16)[0]
            gd = got[b, :2].view(np.float16)[0]
            wq = want[b, 2:].view(np.int8)
            gq = got[b, 2:].view(np.int8)
            diff = np.nonzero(wq != gq)[0]
            problems.append(
                f"{t.name} block {b} of {want.shape[0]}: scale {gd} (reference {wd}), "
                f"{len(diff)} of 32 values differ, first at {diff[:1].tolist()}: "
                f"{gq[diff[:4]].tolist()} (reference {wq[diff[:4]].tolist()})"
            )
        if len(bad) > 3:
            problems.append(f"{t.name}: {len(bad)} differing blocks in all")
    print(
        f"tensors {len(out)} requantized {requantized} blocks {blocks} "
        f"differing {differing}"
    )
    if problems:
        fail("\n".join(problems[:20]))


if __name__ == "__main__":
    main()
