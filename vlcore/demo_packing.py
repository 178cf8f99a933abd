"""Packing demo on generated data: ``python -m vlcore.demo_packing``.

Plans a realistic VLP length mix (captions of 5-77 tokens plus 144- or 576-token images) into packs of
``max_len`` tokens, compares the padding waste with padded batching, then builds one LLaVA-style packed
batch and runs it through the packing ops forward and backward.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch

import vlcore
from vlcore.packing import pack_samples, padded_waste, plan, vlp_length_mix


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Pack a generated VLP batch and run vlcore's packing ops on it.")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32, help="padded-batching baseline batch size")
    parser.add_argument("--channels", type=int, default=256, help="embedding width for the op demo")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() and vlcore.cuda_available() else "cpu")
    args = parser.parse_args(argv)

    lengths = vlp_length_mix(args.samples)
    for algorithm in ("first_fit", "best_fit"):
        t0 = time.perf_counter()
        p = plan(lengths, args.max_len, algorithm=algorithm)
        dt = time.perf_counter() - t0
        print(f"{algorithm:>9}: {len(lengths)} samples -> {len(p.bins)} packs of <= {args.max_len} tokens, "
              f"waste {100 * p.waste:.2f}% (planned in {1e3 * dt:.1f} ms)")
    print(f"  padded batches of {args.batch_size}: waste {100 * padded_waste(lengths, args.batch_size):.2f}%")

    # Build the first pack as a LLaVA-style batch: image placeholders, then caption tokens.
    image_token_id, g = 0, torch.Generator().manual_seed(1)
    samples = []
    for n in lengths[:64]:
        n_image = 576 if n > 576 + 4 else 144
        caption = torch.randint(1, 32000, (n - n_image,), generator=g)
        samples.append({"input_ids": torch.cat([torch.zeros(n_image, dtype=torch.int64), caption])})
    batches, p = pack_samples(samples, args.max_len, image_token_id)
    batch = batches[0].to(args.device)
    dev = torch.device(args.device)
    embed = torch.nn.Embedding(32000, args.channels, device=dev)
    vision = torch.randn(batch.image_positions.numel(), args.channels, device=dev, requires_grad=True)
    x = vlcore.ops.scatter_image_embeds(embed(batch.input_ids), vision, batch.image_positions)
    padded = vlcore.ops.unpack(x, batch.cu_seqlens, batch.max_seqlen)
    repacked = vlcore.ops.pack(padded, batch.cu_seqlens, batch.num_tokens)
    repacked.square().mean().backward()
    assert torch.equal(repacked, x), "pack(unpack(x)) must give x back"
    print(f"pack 0 on {args.device}: {batch.num_samples} samples, {batch.num_tokens} tokens "
          f"({batch.image_positions.numel()} image tokens in {batch.image_spans.shape[0]} images), "
          f"max_seqlen {batch.max_seqlen}; scatter -> unpack {tuple(padded.shape)} -> pack round trip exact, "
          f"grad to vision tokens {tuple(vision.grad.shape)}")


if __name__ == "__main__":
    main()
