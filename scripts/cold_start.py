"""Cold and warm start of one bundle, side by side in one run: each start is a fresh process that loads the
pipeline and makes two images (the first one includes OpenVINO's compile of that size unless the compiled shapes
come from the cache).

    python scripts/cold_start.py BUNDLE [--threads N] [--size 512] [--steps 1] [--guidance 0] [--decoder taesd]

Prints, per start: seconds to load, first image, second image, and the process's peak and final RSS. "no cache"
compiles every time; "cold" starts with an empty compile cache (and fills it); "warm" reads it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, time
from pathlib import Path
t0 = time.perf_counter()
from runtime import Pipeline
from backend.bench.memory import peak_rss_mb, rss_mb
a = json.loads(sys.argv[1])
pipe = Pipeline.load(a["bundle"], engine="openvino", threads=a["threads"], decoder=a["decoder"],
                     compile_cache=bool(a["cache"]), cache=a["cache"] and Path(a["cache"]))
t1 = time.perf_counter()
args = dict(prompt="a red fox in the snow", n=1, steps=a["steps"], guidance=a["guidance"], width=a["size"],
            height=a["size"], seed=1)
pipe.generate(**args)
t2 = time.perf_counter()
pipe.generate(**args)
t3 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "first": t2 - t1, "second": t3 - t2, "peak_rss_mb": peak_rss_mb(),
                  "rss_mb": rss_mb()}))
"""


def start(args: argparse.Namespace, cache: Path | None) -> dict[str, float]:
    spec = {"bundle": str(args.bundle), "threads": args.threads, "decoder": args.decoder, "steps": args.steps,
            "guidance": args.guidance, "size": args.size, "cache": None if cache is None else str(cache)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=0.0)
    parser.add_argument("--decoder", default="vae", choices=["vae", "taesd"])
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="t2i-compiled-"))
    try:
        rows = {"no cache": start(args, None), "cold": start(args, cache), "warm": start(args, cache)}
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"{args.bundle} at {args.size}², {args.steps} step(s), guidance {args.guidance:g}, {args.decoder} decoder")
    print(f"{'start':10s}{'load s':>9s}{'1st image s':>13s}{'2nd image s':>13s}{'ready+1st s':>13s}"
          f"{'peak MB':>9s}{'RSS MB':>9s}")
    for name, r in rows.items():
        print(f"{name:10s}{r['load']:>9.2f}{r['first']:>13.2f}{r['second']:>13.2f}{r['load'] + r['first']:>13.2f}"
              f"{r['peak_rss_mb']:>9.0f}{r['rss_mb']:>9.0f}")
    warm, cold = rows["warm"], rows["no cache"]
    print(f"warm start + first image: {(warm['load'] + warm['first']):.2f} s vs {(cold['load'] + cold['first']):.2f} s "
          f"without the cache ({(cold['load'] + cold['first']) / (warm['load'] + warm['first']):.1f}x)")


if __name__ == "__main__":
    main()
