"""CPU latency per image of a semiseg model: onnxruntime vs PyTorch, same thread count, batch 1.

    python benchmarks/deploy_latency.py                      # the demo config's model (weights do not matter)
    python benchmarks/deploy_latency.py --run runs/demo/sup  # a finished run's delivered model
    python benchmarks/deploy_latency.py --threads 1 --iters 200

Two figures per runtime, median over ``--iters`` calls after a warm-up:
- ``graph``: the network alone on one working-size input (what a deployment's model call costs);
- ``image``: one decoded ``--frame`` image end to end as ``predict`` does it (resize to the working size, forward,
  softmax, bilinear upsampling back to the frame, argmax): PyTorch through the evaluator's ``predict_probs``,
  onnxruntime through ``semiseg.deploy.onnx_predict``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="bundled config or YAML whose model is timed (no --run)")
    parser.add_argument("--run", type=Path, help="a finished run directory: time its delivered model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--frame", default="540,960", help="H,W of the end-to-end image")
    args = parser.parse_args()

    import onnxruntime as ort

    from semiseg.api import load_config
    from semiseg.deploy.onnx_predict import OnnxSegmenter
    from semiseg.evaluation.inference import predict_probs
    from semiseg.export import OPSET, metadata, to_onnx_bytes
    from semiseg.models.factory import build_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is not None:
            from semiseg.api import load_run

            ctx, model = load_run(args.run)
            cfg, classes, meta = ctx.config, ctx.classes, metadata(ctx, OPSET)
        else:  # an untrained network of the config's architecture: latency does not depend on the weights
            import onnx

            from semiseg.data.presets import load_source

            cfg = load_config(args.config)
            classes = load_source(cfg.data.source, cfg.data.root, **cfg.data.options).classes
            torch.manual_seed(0)
            model = build_model(cfg.model.resolved(), classes.num_classes).eval()
            meta = {"preprocessing": {"protocol": "resize", "size": list(cfg.data.size), "window": None,
                                      "stride": None, "size_divisor": 32, "pad_mode": "reflect"},
                    "normalization": {"mean": list(cfg.model.input_normalization().mean)},
                    "classes": {"colors": [list(c) for c in classes.palette()]}}
        proto_bytes = to_onnx_bytes(model, tuple(cfg.data.size), OPSET)
        path = Path(tmp) / "model.onnx"
        if args.run is None:
            proto = onnx.load_from_string(proto_bytes)
            onnx.helper.set_model_props(proto, {"semiseg": json.dumps(meta)})
            onnx.save(proto, str(path))
        else:
            path.write_bytes(proto_bytes)
            path.with_suffix(".json").write_text(json.dumps(meta))
        segmenter = OnnxSegmenter(path, threads=args.threads, batch_size=1)

        h, w = cfg.data.size
        x = torch.rand(1, 3, h, w)
        xn = x.numpy()
        fh, fw = (int(v) for v in args.frame.split(","))
        frame = np.random.default_rng(0).integers(0, 256, (fh, fw, 3), dtype=np.uint8)

        def torch_graph() -> object:
            with torch.inference_mode():
                return model(x)

        def torch_image() -> object:
            return predict_probs(model, frame, protocol="resize", size=(h, w), num_classes=classes.num_classes
                                 ).labels()

        results = {
            "torch graph": median_ms(torch_graph, args.iters),
            "onnxruntime graph": median_ms(lambda: segmenter.session.run(None, {segmenter.input_name: xn}),
                                           args.iters),
            "torch image": median_ms(torch_image, args.iters),
            "onnxruntime image": median_ms(lambda: segmenter.probs(frame).argmax(0), args.iters),
        }
    print(f"model {cfg.model.arch}-{cfg.model.encoder}, working size {h}x{w}, frame {fh}x{fw}, "
          f"{args.threads} thread(s), torch {torch.__version__}, onnxruntime {ort.__version__}, "
          f"median of {args.iters}")
    for name, ms in results.items():
        print(f"  {name:<18} {ms:8.2f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
