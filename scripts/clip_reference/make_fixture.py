#!/usr/bin/env python3
"""Make the CLIP reference fixture that `tests/clip_reference.rs` reproduces (maintainers only; CI
never runs Python, it reads the committed fixture under tests/fixtures/clip_tiny/).

Install (a private venv; the PyPI torch wheel pulls the CUDA runtime packages, ~5 GB, which torch
needs even to import on the CPU):

    python3 -m venv /tmp/clipref && /tmp/clipref/bin/pip install torch transformers safetensors \
        numpy tokenizers onnx && /tmp/clipref/bin/pip install --no-deps open_clip_torch

(`open_clip_torch` is only used for the CLIP BPE merges file it ships; `--no-deps` is enough.)

Run from the repository root:

    /tmp/clipref/bin/python scripts/clip_reference/make_fixture.py               # tiny -> tests/fixtures/clip_tiny
    /tmp/clipref/bin/python scripts/clip_reference/make_fixture.py --full -o /tmp/clip_b32
    CLIP_REFERENCE_DIR=/tmp/clip_b32 cargo test --test clip_reference -- --ignored

What it writes (all reproducible from --seed):
- config.json, model.safetensors: a `transformers.CLIPModel` (vision + text) with seeded random
  weights (HF init perturbed by noise so no LayerNorm is the identity); `logit_scale` = ln 100.
- heads.safetensors: per-task class embeddings `[classes, projection_dim]` (task `random`).
- tokenizer.json: CLIP's byte-level BPE (HF CLIPTokenizer, tokenizers backend) built from the
  real CLIP merges list, cut to the first --merges merges (the full file is ~3.6 MB; --full keeps
  all 48894).
- reference.safetensors: inputs and the expected outputs, computed in float64 from the same f32
  weights:
    pixels [N,3,H,W] in [0,1], labels [N] i64, dlogits [N,K];
    logits [N,K] = exp(logit_scale) * normalize(features) @ normalize(head)^T; features [N,P];
    loss [N] per-sample CE; dx = d(sum loss)/d pixels (CLIP mean/std applied inside);
    vjp_dx = d(sum dlogits*logits)/d pixels;
    grad.<name> = d(sum loss)/d weight for a few vision weights;
    gram.<name> = mean over all token rows of X^T X, X the input of that linear layer;
    text_ids [T,L] i64 (tokenised prompts, padded), text_embeds [T,P] (text_projection of the
    pooled EOT state, unnormalised); zeroshot_head [C,P] (per class: normalise each template's
    embedding, average, normalise).
- reference.json: the prompts, class names and templates used, the token ids the tokenizer gave,
  and the versions of torch/transformers that produced it.
"""
import argparse
import gzip
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
PROMPTS = ["a photo of a cat.", "A   BLURRY photo of the number: \"7\".", "itap of a dog's toy!", "zebra"]
CLASSES = ["cat", "dog", "airplane"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of a {}.", "itap of a {}."]
GRADS = [
    "visual_projection.weight",
    "vision_model.embeddings.class_embedding",
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.pre_layrnorm.weight",
    "vision_model.encoder.layers.0.mlp.fc1.weight",
    "vision_model.encoder.layers.0.self_attn.q_proj.bias",
]
GRAMS = [
    "vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "vision_model.encoder.layers.0.self_attn.out_proj.weight",
    "vision_model.encoder.layers.1.mlp.fc2.weight",
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def clip_tokenizer(n_merges, out_dir):
    """HF CLIPTokenizer from the real CLIP merges (as open_clip / openai build the vocabulary)."""
    import importlib.util

    from transformers import CLIPTokenizer

    spec = importlib.util.find_spec("open_clip")  # the package itself is not imported (needs torchvision)
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]][:n_merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)
    tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    return tok, len(vocab)


def perturb(model, gen, scale):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(100.0))
            elif name.endswith("layer_norm1.weight") or "layrnorm.weight" in name or "layernorm.weight" in name \
                    or name.endswith("layer_norm2.weight") or name.endswith("final_layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default="tests/fixtures/clip_tiny")
    ap.add_argument("--full", action="store_true", help="ViT-B/32 + CLIP text sizes (random weights, ~600 MB)")
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--merges", type=int, default=1000, help="BPE merges kept in the tiny tokenizer")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--classes", type=int, default=5)
    args = ap.parse_args()

    from transformers import CLIPConfig, CLIPModel
    import transformers

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    n_merges = 49152 - 256 - 2 if args.full else args.merges
    tok, vocab_size = clip_tokenizer(n_merges, args.out)
    bos, eos = vocab_size - 2, vocab_size - 1

    if args.full:
        vision = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      patch_size=32, image_size=224, hidden_act="quick_gelu")
        text = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                    max_position_embeddings=77, vocab_size=vocab_size, hidden_act="quick_gelu",
                    bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
        proj, noise = 512, 0.01
    else:
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      patch_size=8, image_size=32, hidden_act="quick_gelu")
        text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=24, vocab_size=vocab_size, hidden_act="quick_gelu",
                    bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
        proj, noise = 16, 0.05
    cfg = CLIPConfig(vision_config=vision, text_config=text, projection_dim=proj)
    model = CLIPModel(cfg).eval()
    perturb(model, gen, noise)
    model.save_pretrained(args.out, safe_serialization=True)
    # Keep only what we need next to the weights.
    for extra in ("generation_config.json",):
        p = os.path.join(args.out, extra)
        if os.path.exists(p):
            os.remove(p)

    n, k, img = args.images, args.classes, vision["image_size"]
    pixels = torch.rand((n, 3, img, img), generator=gen, dtype=torch.float32)
    labels = torch.randint(0, k, (n,), generator=gen, dtype=torch.int64)
    dlogits = torch.randn((n, k), generator=gen, dtype=torch.float32)
    head = torch.randn((k, proj), generator=gen, dtype=torch.float32)
    save_file({"random": head.contiguous()}, os.path.join(args.out, "heads.safetensors"))

    # Float64 reference from the same f32 weights.
    m64 = model.double()
    mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
    x = pixels.double().requires_grad_(True)
    grams = {}
    hooks = []
    modules = dict(m64.named_modules())
    for gname in GRAMS:
        mod = modules[gname[: -len(".weight")]]

        def hook(mod, inp, gname=gname):
            rows = inp[0].detach().reshape(-1, inp[0].shape[-1])
            grams[gname] = rows.T @ rows / rows.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))

    def forward(xx):
        out = m64.vision_model(pixel_values=(xx - mean) / std)
        feats = m64.visual_projection(out.pooler_output)
        u = feats / feats.norm(dim=-1, keepdim=True)
        h = head.double()
        hn = h / h.norm(dim=-1, keepdim=True)
        return feats, m64.logit_scale.exp() * u @ hn.T

    feats, logits = forward(x)
    for h in hooks:
        h.remove()
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    params = dict(m64.named_parameters())
    wrt = [x] + [params[g] for g in GRADS]
    grads = torch.autograd.grad(loss.sum(), wrt)
    x2 = pixels.double().requires_grad_(True)
    _, logits2 = forward(x2)
    (vjp_dx,) = torch.autograd.grad((logits2 * dlogits.double()).sum(), [x2])

    # Text tower.
    ctx = text["max_position_embeddings"]
    enc = tok(PROMPTS, padding="max_length", max_length=ctx, truncation=True)
    text_ids = torch.tensor(enc["input_ids"], dtype=torch.int64)
    with torch.no_grad():
        tout = m64.text_model(input_ids=text_ids)
        text_embeds = m64.text_projection(tout.pooler_output)
        rows = []
        for c in CLASSES:
            e = tok([t.format(c) for t in TEMPLATES], padding="max_length", max_length=ctx, truncation=True)
            ids = torch.tensor(e["input_ids"], dtype=torch.int64)
            emb = m64.text_projection(m64.text_model(input_ids=ids).pooler_output)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            mean_e = emb.mean(dim=0)
            rows.append(mean_e / mean_e.norm())
        zeroshot = torch.stack(rows)

    ref = {
        "pixels": pixels,
        "labels": labels,
        "dlogits": dlogits,
        "logits": logits.detach().float(),
        "features": feats.detach().float(),
        "loss": loss.detach().float(),
        "dx": grads[0].float(),
        "vjp_dx": vjp_dx.float(),
        "text_ids": text_ids,
        "text_embeds": text_embeds.float(),
        "zeroshot_head": zeroshot.float(),
    }
    for g, v in zip(GRADS, grads[1:]):
        ref["grad." + g] = v.float()
    for g, v in grams.items():
        ref["gram." + g] = v.float()
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(args.out, "reference.safetensors"))
    meta = {
        "seed": args.seed,
        "prompts": PROMPTS,
        "prompt_ids": [tok(p)["input_ids"] for p in PROMPTS],
        "context_length": ctx,
        "classes": CLASSES,
        "templates": TEMPLATES,
        "grads": GRADS,
        "grams": GRAMS,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "note": "expected outputs computed in float64 from the f32 weights; regenerate with "
                "scripts/clip_reference/make_fixture.py",
    }
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out} ({total / 1e6:.2f} MB); logits[0] = {logits[0].tolist()}")


if __name__ == "__main__":
    sys.exit(main())
