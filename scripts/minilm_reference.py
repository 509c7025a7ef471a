#!/usr/bin/env python3
"""Reference sentence embeddings of a BERT sentence encoder, computed without torch.

What sentence-transformers does for this model (modules.json: Transformer → mean Pooling →
Normalize), written out in numpy from the published safetensors and the `tokenizers` package's
reading of tokenizer.json (the tokenizer sentence-transformers itself uses). Its output is
committed as tests/data/minilm_reference.json; tests/semantic_embed.rs checks that qnode's candle
encoder agrees (cosine >= 0.999).

Usage: python3 scripts/minilm_reference.py models/minilm-l6 > tests/data/minilm_reference.json
       python3 scripts/minilm_reference.py models/m3e-small --zh > tests/data/m3e_reference.json
(`--zh` adds Chinese sentences; the pooling is 1_Pooling/config.json's when the directory has
one — CLS or mean — and mean otherwise, as for both of these.)
Needs: numpy, tokenizers.
"""
import json
import math
import struct
import sys

import numpy as np
from tokenizers import Tokenizer

SENTENCES = [
    "Who are you?",
    "who r u",
    "What is the capital of France?",
    "What is not the capital of France?",
    "How do I reset my password in 3 steps?",
    "The quick brown fox jumps over the lazy dog.",
    "法国的首都是哪里？",
    "",
]

# More Chinese (`--zh`), for an encoder that reads it: paraphrases, a negation, a number.
ZH_SENTENCES = [
    "番茄炒蛋怎么做？",
    "西红柿炒鸡蛋的做法",
    "可以退货吗？",
    "为什么不能退货？",
    "北京到上海的高铁要多久？",
    "3岁的孩子可以吃蜂蜜吗？",
    "How do I reset my password? 我忘记密码了",
]


def load_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            continue  # embeddings.position_ids (I64): not a weight
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"]).astype(np.float64)
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):  # exact (erf) GELU, as BERT's "gelu"
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def embed(w, cfg, ids, pooling="mean"):
    p = "" if "embeddings.word_embeddings.weight" in w else "bert."
    eps = cfg["layer_norm_eps"]
    heads = cfg["num_attention_heads"]
    n = len(ids)
    x = (w[p + "embeddings.word_embeddings.weight"][ids]
         + w[p + "embeddings.position_embeddings.weight"][:n]
         + w[p + "embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(x, w[p + "embeddings.LayerNorm.weight"], w[p + "embeddings.LayerNorm.bias"], eps)
    d = x.shape[1] // heads
    for i in range(cfg["num_hidden_layers"]):
        q = f"{p}encoder.layer.{i}."
        lin = lambda t, name: t @ w[q + name + ".weight"].T + w[q + name + ".bias"]
        def split(t):
            return t.reshape(n, heads, d).transpose(1, 0, 2)
        qh, kh, vh = (split(lin(x, f"attention.self.{k}")) for k in ("query", "key", "value"))
        s = qh @ kh.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        ctx = (s @ vh).transpose(1, 0, 2).reshape(n, heads * d)
        x = layer_norm(x + lin(ctx, "attention.output.dense"),
                       w[q + "attention.output.LayerNorm.weight"],
                       w[q + "attention.output.LayerNorm.bias"], eps)
        h = gelu(lin(x, "intermediate.dense"))
        x = layer_norm(x + lin(h, "output.dense"), w[q + "output.LayerNorm.weight"],
                       w[q + "output.LayerNorm.bias"], eps)
    v = x[0] if pooling == "cls" else x.mean(0)
    return v / max(np.linalg.norm(v), 1e-12)


def pooling_of(model_dir):
    """`cls` or `mean`, from sentence-transformers' 1_Pooling/config.json (mean when absent)."""
    try:
        cfg = json.load(open(f"{model_dir}/1_Pooling/config.json"))
    except FileNotFoundError:
        return "mean"
    return "cls" if cfg.get("pooling_mode_cls_token") else "mean"


def main(model_dir, zh=False):
    w = load_safetensors(f"{model_dir}/model.safetensors")
    cfg = json.load(open(f"{model_dir}/config.json"))
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    tok.no_padding()
    tok.enable_truncation(256)  # sentence_bert_config.json: max_seq_length
    pooling = pooling_of(model_dir)
    out = []
    for s in SENTENCES + (ZH_SENTENCES if zh else []):
        ids = tok.encode(s).ids
        v = embed(w, cfg, ids, pooling)
        out.append({"text": s, "ids": ids, "embedding": [round(float(x), 7) for x in v]})
    json.dump(out, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1], zh="--zh" in sys.argv[2:])
