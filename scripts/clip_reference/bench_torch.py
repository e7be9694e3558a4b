#!/usr/bin/env python3
"""The engine benchmark's computation in PyTorch eager on the CPU, for comparison with
`benches/engine.rs`: a ViT-B/32-sized `transformers` CLIP vision tower with random weights, batch
32, 2 threads; images/s for a forward pass (logits) and for forward + input gradient (summed
cross-entropy backpropagated to [0, 1] pixels, CLIP normalisation included).

Maintainers only; skips cleanly (exit 0, a message) when torch or transformers is missing.
Install as in make_fixture.py. Run: `python3 scripts/clip_reference/bench_torch.py
[--threads 2] [--batch 32] [--rust-forward IPS --rust-grad IPS]` (scripts/bench-engine.sh passes
the Rust numbers and prints the ratios).
"""
import argparse
import math
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rust-forward", type=float)
    ap.add_argument("--rust-grad", type=float)
    args = ap.parse_args()
    try:
        import torch
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    except ImportError as e:
        print(f"bench_torch: skipped ({e}); install torch and transformers to compare")
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           patch_size=32, image_size=224, hidden_act="quick_gelu", projection_dim=512)
    model = CLIPVisionModelWithProjection(cfg).eval()
    head = torch.randn(10, 512)
    head = head / head.norm(dim=-1, keepdim=True)
    scale = math.log(100.0)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = torch.rand(args.batch, 3, 224, 224)
    labels = torch.arange(args.batch) % 10

    def logits(xx):
        f = model(pixel_values=(xx - mean) / std).image_embeds
        return math.exp(scale) * (f / f.norm(dim=-1, keepdim=True)) @ head.T

    def forward():
        with torch.no_grad():
            return logits(x)

    def grad():
        xx = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(logits(xx), labels, reduction="sum")
        (g,) = torch.autograd.grad(loss, [xx])
        return g

    def ips(fn):
        fn()  # warm-up
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return args.batch / statistics.median(times)

    f, g = ips(forward), ips(grad)
    print(f"torch {torch.__version__} eager CPU, {args.threads} threads, batch {args.batch}: "
          f"forward {f:.1f} images/s, forward+input grad {g:.1f} images/s")
    if args.rust_forward:
        print(f"ratio mergeattack/torch: forward {args.rust_forward / f:.2f}x", end="")
        if args.rust_grad:
            print(f", forward+input grad {args.rust_grad / g:.2f}x (target >= 1.2x)")
        else:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
