"""`mambast bench one-frame`: one image through `Stylizer.stylize`, unpadded (today) against padded to the batch size
(how every call ran before single images stopped paying for clip padding), alternated in one run.

A clip pads its last batch to `batch_size` so that chunks processed anywhere join bit-exactly
(`StylizerConfig.pad_batches`); a single image or a live frame has no chunk to match and runs alone.
Prints each run, the medians and their ratio; the last line is one JSON object.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace

import cv2
import torch

from pipeline.images import load_image
from pipeline.packaged_media import opencv_data, starry_night


def register_one_frame_bench(benches) -> None:
    p = benches.add_parser("one-frame", help="Stylizer.stylize on one image: unpadded vs padded to the batch size")
    p.add_argument("--image", help="content image (default: opencv-doc's aero1.jpg)")
    p.add_argument("--size", default="768x576", help="the image is resized to WxH first (default 768x576)")
    p.add_argument("--working-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4, help="the batch a padded call fills (default 4)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", help="weights folder (default: the bundled weights)")
    p.set_defaults(func=run_one_frame_bench)


def run_one_frame_bench(args) -> int:
    from pipeline import Stylizer

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.size.lower().split("x"))
    image = cv2.resize(load_image(args.image or opencv_data("aero1.jpg")), (width, height),
                       interpolation=cv2.INTER_AREA)
    stylizer = Stylizer(args.weights, style=str(starry_night()), working_size=args.working_size,
                        batch_size=args.batch_size, temporal=False)
    paths = {"unpadded": replace(stylizer.config, pad_batches=False),
             "padded": replace(stylizer.config, pad_batches=True)}
    stylizer.stylize(image)  # encodes the style for this token grid once; both paths read the same cached code
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.runs):
        for name, config in paths.items():
            stylizer.config = config
            start = time.perf_counter()
            stylizer.stylize(image)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"  {name:9s} " + " / ".join(f"{v:.2f}" for v in values) + f" s  (median {medians[name]:.2f} s)")
    ratio = medians["padded"] / medians["unpadded"]
    print(f"  one image {width}x{height} at working size {args.working_size}: unpadded is {ratio:.2f}x faster "
          f"than padding it to a batch of {args.batch_size}")
    print(json.dumps({"runs": times, "median_s": medians, "speedup": round(ratio, 3), "size": [width, height],
                      "working_size": args.working_size, "batch_size": args.batch_size, "threads": args.threads}))
    return 0
