#!/usr/bin/env python3
"""hegraph's CLIP encoders against PyTorch eager and onnxruntime, on the same weights, in one run.

The workload is `hegraph bench clip`'s: the encoders only (inputs prepared once and reused), image batch 32,
image batch 1, and 1,000 prompts ("a photo of a <subject>, number <i>.") in chunks of 256. The weights are the
random ViT-B/32-sized checkpoint that `hegraph bench clip` writes (the same file loaded by all three):
PyTorch runs transformers' `CLIPModel` eagerly under `torch.inference_mode()`, onnxruntime runs the image
and text feature graphs exported from that model. Prompts are given to the peers sorted by length before
chunking, so their padding costs them next to nothing (hegraph packs prompts without padding).

Rounds alternate hegraph, PyTorch and onnxruntime, each at the same thread count; the table keeps each
one's best round (the machine is shared, so the best round is the least disturbed one) and prints ratios.

Needs: `pip install torch transformers onnx onnxruntime` (bench-only, never a dependency of hegraph) and a
release build (`cargo build --release --locked`). Usage:

    python3 benches/clip_peer.py [--hegraph target/release/hegraph] [--threads 2] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIG_BATCH = 32
PROMPTS = 1000
TEXT_CHUNK = 256
SUBJECTS = ["cat", "dog", "rocket", "cup of coffee", "astronaut", "horse", "camera", "flower"]


def default_checkpoint():
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hegraph" / "models" / "hegraph-bench-vit-b-32"


def timed(min_seconds, f):
    """One untimed call, then repeats until `min_seconds` have passed (at least 3): mean seconds per call."""
    f()
    start = time.perf_counter()
    n = 0
    while n < 3 or (time.perf_counter() - start < min_seconds and n < 1000):
        f()
        n += 1
    return (time.perf_counter() - start) / n


def run_hegraph(exe, checkpoint, threads, seconds):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "clip.json"
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        cmd = [str(exe), "bench", "clip", "--checkpoint", str(checkpoint), "--seconds", str(seconds),
               "--json", str(out)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        r = json.loads(out.read_text())
    return {"batch32": r["images_per_s_batch32"], "batch1": r["images_per_s_batch1"],
            "prompts_s": r["ms_per_1000_prompts"] / 1000.0}


def prompt_batches(tokenizer_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tok.no_padding()
    tok.no_truncation()
    prompts = [f"a photo of a {SUBJECTS[i % len(SUBJECTS)]}, number {i}." for i in range(PROMPTS)]
    ids = [e.ids for e in tok.encode_batch(prompts)]
    ids.sort(key=len)
    batches = []
    for c in range(0, len(ids), TEXT_CHUNK):
        chunk = ids[c:c + TEXT_CHUNK]
        n = max(map(len, chunk))
        batches.append([row + [0] * (n - len(row)) for row in chunk])
    return batches


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hegraph", default="target/release/hegraph", help="the hegraph binary")
    ap.add_argument("--checkpoint", type=Path, default=default_checkpoint(),
                    help="the bench checkpoint (written by hegraph when missing)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=2.0, help="least time per measurement")
    a = ap.parse_args()

    exe = Path(a.hegraph)
    if not exe.exists():
        sys.exit(f"{exe} not found: build it with `cargo build --release --locked` or pass --hegraph")
    try:
        import numpy as np
        import onnxruntime as ort
        import torch
        from transformers import CLIPModel
    except ImportError as e:
        sys.exit(f"{e}: pip install torch transformers onnx onnxruntime")

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    # The first hegraph run writes the checkpoint if it is missing; it also counts as round 1's figure.
    print(f"hegraph round 1 ({exe}, {a.threads} threads)...", flush=True)
    results = {"hegraph": [run_hegraph(exe, a.checkpoint, a.threads, a.seconds)], "pytorch": [], "onnxruntime": []}

    model = CLIPModel.from_pretrained(str(a.checkpoint), torch_dtype=torch.float32).eval()
    size = model.config.vision_config.image_size
    gen = torch.Generator().manual_seed(0)
    images32 = torch.randn(BIG_BATCH, 3, size, size, generator=gen)
    images1 = images32[:1].clone()
    batches = prompt_batches(a.checkpoint / "tokenizer.json")
    text_batches = [torch.tensor(b, dtype=torch.int64) for b in batches]

    onnx_dir = a.checkpoint / "peer-onnx"
    onnx_dir.mkdir(exist_ok=True)
    image_onnx, text_onnx = onnx_dir / "image.onnx", onnx_dir / "text.onnx"
    stamp = onnx_dir / "weights-mtime"
    weights_mtime = str((a.checkpoint / "model.safetensors").stat().st_mtime_ns)
    if not (image_onnx.exists() and text_onnx.exists() and stamp.exists() and stamp.read_text() == weights_mtime):
        print("exporting the ONNX graphs from the same weights...", flush=True)

        class Image(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, pixel_values):
                out = self.m.get_image_features(pixel_values=pixel_values)
                return getattr(out, "pooler_output", out)

        class Text(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids):
                out = self.m.get_text_features(input_ids=input_ids)
                return getattr(out, "pooler_output", out)

        with torch.inference_mode():
            torch.onnx.export(Image(model), (images1,), str(image_onnx), input_names=["pixel_values"],
                              output_names=["features"], dynamic_axes={"pixel_values": {0: "batch"}},
                              opset_version=17, dynamo=False)
            torch.onnx.export(Text(model), (text_batches[0],), str(text_onnx), input_names=["input_ids"],
                              output_names=["features"], dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}},
                              opset_version=17, dynamo=False)
        stamp.write_text(weights_mtime)

    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    image_sess = ort.InferenceSession(str(image_onnx), so, providers=["CPUExecutionProvider"])
    text_sess = ort.InferenceSession(str(text_onnx), so, providers=["CPUExecutionProvider"])
    np32, np1 = images32.numpy(), images1.numpy()
    np_text = [b.numpy() for b in text_batches]

    # The export must compute what the eager model computes (same weights, same graph), also at a prompt
    # length other than the one it was traced at.
    def cosine(a, b):
        return float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())

    with torch.inference_mode():
        eager_img = model.get_image_features(pixel_values=images1)
        eager_img = getattr(eager_img, "pooler_output", eager_img).numpy()
        eager_txt = model.get_text_features(input_ids=text_batches[-1])
        eager_txt = getattr(eager_txt, "pooler_output", eager_txt).numpy()
    ort_img = image_sess.run(None, {"pixel_values": np1})[0]
    ort_txt = text_sess.run(None, {"input_ids": text_batches[-1].numpy()})[0]
    print(f"onnxruntime vs PyTorch, smallest cosine: images {cosine(eager_img, ort_img):.7f}, "
          f"prompts {cosine(eager_txt, ort_txt):.7f} (prompt lengths {text_batches[0].shape[1]}"
          f"-{text_batches[-1].shape[1]} tokens)")

    def torch_round():
        def img(x):
            out = model.get_image_features(pixel_values=x)
            return getattr(out, "pooler_output", out)

        def txt():
            for b in text_batches:
                out = model.get_text_features(input_ids=b)
                getattr(out, "pooler_output", out)

        with torch.inference_mode():
            t32 = timed(a.seconds, lambda: img(images32))
            t1 = timed(a.seconds, lambda: img(images1))
            tp = timed(a.seconds, txt)
        return {"batch32": BIG_BATCH / t32, "batch1": 1 / t1, "prompts_s": tp}

    def ort_round():
        t32 = timed(a.seconds, lambda: image_sess.run(None, {"pixel_values": np32}))
        t1 = timed(a.seconds, lambda: image_sess.run(None, {"pixel_values": np1}))
        tp = timed(a.seconds, lambda: [text_sess.run(None, {"input_ids": b}) for b in np_text])
        return {"batch32": BIG_BATCH / t32, "batch1": 1 / t1, "prompts_s": tp}

    for r in range(1, a.rounds + 1):
        if r > 1:
            print(f"hegraph round {r}...", flush=True)
            results["hegraph"].append(run_hegraph(exe, a.checkpoint, a.threads, a.seconds))
        print(f"PyTorch round {r}...", flush=True)
        results["pytorch"].append(torch_round())
        print(f"onnxruntime round {r}...", flush=True)
        results["onnxruntime"].append(ort_round())

    def best(name, key):
        rows = [x[key] for x in results[name]]
        return min(rows) if key == "prompts_s" else max(rows)

    def rounds(name, key, fmt):
        return " / ".join(fmt.format(x[key]) for x in results[name])

    print()
    print(f"CLIP ViT-B/32 sizes, random weights ({a.checkpoint}), {a.threads} threads, encoders only, "
          f"{a.rounds} rounds (each round's figure, best last)")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print()
    print("| work | hegraph | PyTorch eager | onnxruntime | hegraph / PyTorch | hegraph / onnxruntime |")
    print("|---|---|---|---|---|---|")
    for key, label, fmt in [("batch32", "image encoding, batch 32 (img/s)", "{:.1f}"),
                            ("batch1", "image encoding, batch 1 (img/s)", "{:.1f}"),
                            ("prompts_s", "1,000 prompts (s)", "{:.2f}")]:
        h, p, o = best("hegraph", key), best("pytorch", key), best("onnxruntime", key)
        # Ratios are speed ratios: > 1 means hegraph is faster.
        rp, ro = (p / h, o / h) if key == "prompts_s" else (h / p, h / o)
        cells = [f"{rounds(n, key, fmt)} → **{fmt.format(best(n, key))}**" for n in ("hegraph", "pytorch", "onnxruntime")]
        print(f"| {label} | {cells[0]} | {cells[1]} | {cells[2]} | {rp:.2f}× | {ro:.2f}× |")


if __name__ == "__main__":
    main()
