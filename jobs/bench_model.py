"""`mambast bench model`: s/frame of the model's inference paths, measured in one run on this machine.

Paths, each timed in its own fresh process (so its peak RSS is its own), after one untimed warm-up frame:

- `cached`:   our inference path: the style encoded once (`encode_style`, with the MSTD state sequence cached
              when it fits), then `stylize` per frame: content encoder + state readout + CNN decoder.
- `ref_scan`: the same path with every scan run by `selective_scan_ref` (the sequential oracle); the MSTD
              cache then holds the style's scan inputs (u, Δ, B), since the state cache is itself a fast scan.
- `no_cache`: the plain forward per frame: style embedded, encoded and reshuffled for every frame, fast scan.
- `official` (with --official): the official inference path (docs/mamba-st.md §4.1): the full training
              forward under no_grad, i.e. the stylized pass plus the two identity passes, all with the
              reference scan and a fresh permutation per call, plus 5 VGG-19 encodes (random weights of the
              right shapes: only the cost matters here).

`--baseline REV` times an earlier implementation side by side: `cached` with the model code of git revision REV
(its models/ and configs/, extracted to a temporary folder that comes first on the child's import path), in
`--rounds` alternating pairs of processes with today's `cached`, so that both see the same machine. Nothing of
the old code stays in the model. On a shared machine compare the CPU seconds too (they count only this process's
work); the wall-clock ratio is what a user sees.

`--profile` adds CPU seconds by stage of one more `cached` frame (and of the baseline's): patch embed, content
encoder, MSTD, CNN decoder, and inside the two Mamba stages their linear layers, depthwise convs and LayerNorms,
the rest being the scans and their layout work (`_profile_frame`; the same split for any revision).

Measured for issue 22 (official widths, random weights, 512², this 2-core box; 61ea76c~1 is the code before it):
`mambast bench model --config official --size 512 --threads 2 --paths cached --baseline 61ea76c~1 --rounds 3
--frames 2 --profile`, the box otherwise idle for the last two rounds: baseline 4.39 / 4.40 s/frame, cached
2.81 / 3.71 s/frame; with --threads 1 (another job on the other core): 10.2 -> 5.9 s/frame (1.73x). By stage
(CPU s, 2 threads): content encoder scans + layout 5.85 -> 3.04, MSTD scans + layout 1.57 -> 0.97, linear
layers, LayerNorms and CNN decoder unchanged within noise (0.9, 0.05, 1.5).

Ratios printed: ref_scan / cached (the fast scan's speed-up), no_cache / cached (the style cache's),
official / cached, baseline / cached. The last line is one JSON object.
"""
from __future__ import annotations

import io
import json
import os
import platform
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from models.errors import UserError

PATHS = ("cached", "ref_scan", "no_cache")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------------
# One path in a child process


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; jobs/bench_pipeline.py's own_peak_rss_mb explains why not ru_maxrss). Read
    here rather than imported: a baseline child must not import the pipeline against an older models package."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_model(config: str, weights: str | None, **overrides):
    from models.checkpoint import load_model, model_config
    from models.mambast import MambaST
    if weights:
        return load_model(weights, **overrides)
    cfg = model_config(config)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return MambaST(cfg).eval()


def _measure(path: str, config: str, weights: str | None, size: int, frames: int, threads: int,
             profile: bool = False) -> dict:
    """Time `frames` frames of one path at size×size (after one warm-up frame) in this process; with `profile`,
    one more `cached` frame stage by stage (`_profile_frame`)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    content = torch.rand(frames + 1, 1, 3, size, size, generator=g)
    style = torch.rand(1, 3, size, size, generator=g)
    overrides = {"scan_backend": "ref", "style_cache": "projections"} if path in ("ref_scan", "official") else {}
    model = _build_model(config, weights, **overrides)
    grid = model.token_grid(size, size)
    base_rss = _peak_rss_mb()
    t0 = time.perf_counter()
    code = model.encode_style(style, grid, seed=0) if path in ("cached", "ref_scan") else None
    style_ms = (time.perf_counter() - t0) * 1000
    vgg = _random_vgg() if path == "official" else None
    wall, cpu = [], []
    with torch.no_grad():
        for i in range(frames + 1):
            t, c = time.perf_counter(), time.process_time()
            if path in ("cached", "ref_scan"):
                model.stylize(content[i], code)
            elif path == "no_cache":
                model(content[i], style, seed=i)
            else:
                _official_forward(model, vgg, content[i], style)
            if i > 0:  # frame 0 warms up (allocator, oneDNN primitives)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
    import models
    stages = _profile_frame(model, content[0], code) if profile and path == "cached" else None
    return {"path": path, "size": size, "frames": frames, "models": str(Path(models.__file__).parent),
            **({"stages_cpu_ms": stages} if stages else {}), "style_ms": round(style_ms, 1),
            "ms_per_frame": round(1000 * sum(wall) / frames, 1), "cpu_ms_per_frame": round(1000 * sum(cpu) / frames, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "model_rss_mb": round(base_rss, 1)}


def _profile_frame(model, frame, code) -> dict[str, float]:
    """CPU ms of one `cached` frame by stage, through methods and module types that every revision has: the
    stages of `MambaST.stylize_tokens` called one by one, and inside the Mamba stages the time of the linear
    layers, convolutions and LayerNorms (forward hooks); the rest of those stages is the scans and their layout
    work (cross-scan/merge, x/dt projections, readouts)."""
    import torch.nn as nn

    from models.mambast import pad_to_multiple
    inner, started = {"linear layers": 0.0, "depthwise conv": 0.0, "LayerNorms": 0.0}, {}
    kinds = {nn.Linear: "linear layers", nn.Conv2d: "depthwise conv", nn.LayerNorm: "LayerNorms"}
    hooks = []
    for module in model.mamba.modules():
        kind = kinds.get(type(module))
        if kind:
            hooks.append(module.register_forward_pre_hook(lambda m, a: started.__setitem__(m, time.process_time())))
            hooks.append(module.register_forward_hook(
                lambda m, a, o, kind=kind: inner.__setitem__(kind, inner[kind] + time.process_time() - started[m])))
    stages = {}

    def stage(name, fn, *args):
        before, t = dict(inner), time.process_time()
        out = fn(*args)
        stages[name] = 1000 * (time.process_time() - t)
        if name in ("content encoder", "MSTD"):
            for kind in inner:
                stages[f"  {name}: {kind}"] = 1000 * (inner[kind] - before[kind])
            stages[f"  {name}: scans + layout"] = stages[name] - sum(1000 * (inner[k] - before[k]) for k in inner)
        return out

    with torch.no_grad():
        x, _ = pad_to_multiple(frame, model.cfg.patch_size)
        embedded = stage("patch embed", model.embedding, x)
        y = stage("content encoder", model.mamba.encoder_c, embedded)

        def mstd(y):
            for layer, layer_code in zip(model.mamba.decoder.layers, code.layers):
                y = layer.forward_cached(y, layer_code)
            return model.mamba.decoder.norm(y)
        tokens = stage("MSTD", mstd, y)
        stage("CNN decoder", model.decode_tokens, tokens)
    for hook in hooks:
        hook.remove()
    return {k: round(v, 1) for k, v in stages.items()}


def _random_vgg():
    from models.perceptual import vgg_normalised_layers
    torch.manual_seed(0)
    return vgg_normalised_layers()[:44].eval()


def _official_forward(model, vgg, content, style):
    """What the official test/eval scripts run per image: Ics, Icc, Iss and 5 VGG encodes (losses)."""
    ics = model(content, style)
    icc = model(content, content)
    iss = model(style, style)
    for img in (content, style, ics, icc, iss):
        vgg(img)


def _run_child(job: dict, code_root: Path | None = None) -> dict:
    """Run `_measure(**job)` in a fresh interpreter; with `code_root`, its `models` package comes from there."""
    from jobs.cli import LAUNCH_ENVIRONMENT  # here, not at the top: the child imports this module too

    paths = [str(code_root)] if code_root else []
    # the environment `mambast` was started with (not its OMP_WAIT_POLICY default): both revisions see the same one
    env = {**LAUNCH_ENVIRONMENT,
           "PYTHONPATH": os.pathsep.join(paths + [str(REPO_ROOT), LAUNCH_ENVIRONMENT.get("PYTHONPATH", "")])}
    # -P: no working directory on the import path ahead of PYTHONPATH, which would shadow the baseline's models
    proc = subprocess.run([sys.executable, "-P", "-m", "jobs.bench_model", json.dumps(job)], env=env,
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        error = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"path": job["path"], "size": job["size"], "error": error[:300]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------
# The baseline's code


def extract_code(rev: str, into: Path, folders: tuple[str, ...] = ("models", "configs")) -> Path:
    """`folders` of git revision `rev` into `into`; returns `into`. One UserError line if git fails."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", rev, *folders],
                              capture_output=True)
    except OSError as e:
        raise UserError(f"--baseline: cannot run git ({e.strerror})") from None
    if proc.returncode != 0:
        detail = (proc.stderr.decode(errors="replace").strip().splitlines() or ["git archive failed"])[-1]
        raise UserError(f"--baseline {rev[:40]!r}: {detail[:200]}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


# ----------------------------------------------------------------------------------------------------------
# The bench


def _stage_table(results: list[dict]) -> str:
    """The `--profile` stages side by side: one column per result that has them (baseline first)."""
    columns = [r for r in sorted(results, key=lambda r: r["path"] != "baseline") if r.get("stages_cpu_ms")]
    if not columns:
        return ""
    names = list(dict.fromkeys(k for r in columns for k in r["stages_cpu_ms"]))
    lines = [f"  {'CPU s/frame by stage':40s}" + "".join(f"{r['path']:>10s}" for r in columns)]
    for name in names:
        lines.append(f"  {name:40s}" + "".join(f"{r['stages_cpu_ms'].get(name, 0) / 1000:>10.2f}" for r in columns))
    return "\n".join(lines)


def _line(label: str, result: dict) -> str:
    if "error" in result:
        return f"  {result['size']}²  {label:14s} {result['error']}"
    return (f"  {result['size']}²  {label:14s} {result['ms_per_frame'] / 1000:>8.2f} s/frame  (CPU "
            f"{result['cpu_ms_per_frame'] / 1000:.2f} s)   peak RSS {result['peak_rss_mb']:.0f} MB")


def _mean(results: list[dict]) -> dict:
    """One result from the rounds of one path: the mean of each per-frame time, the largest RSS."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    mean = dict(ok[0], rounds=len(ok))
    for key in ("ms_per_frame", "cpu_ms_per_frame", "style_ms"):
        mean[key] = round(sum(r[key] for r in ok) / len(ok), 1)
    if "stages_cpu_ms" in mean:
        mean["stages_cpu_ms"] = {k: round(sum(r["stages_cpu_ms"][k] for r in ok) / len(ok), 1)
                                 for k in ok[0]["stages_cpu_ms"]}
    mean["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    return mean


def run_model_bench(config: str, weights: str | None, sizes: list[int], frames: int, threads: int,
                    official: bool = False, paths: tuple[str, ...] = PATHS, baseline: str | None = None,
                    rounds: int = 1, profile: bool = False) -> dict:
    paths = tuple(paths) + (("official",) if official else ())
    results = []
    with tempfile.TemporaryDirectory(prefix="mambast-baseline-") as tmp:
        code_root = extract_code(baseline, Path(tmp)) if baseline else None
        for size in sizes:
            def job(path):
                n = 1 if path in ("ref_scan", "official") else frames
                return dict(path=path, config=config, weights=weights and str(Path(weights).resolve()), size=size,
                            frames=n, threads=threads, profile=profile)

            if baseline:  # alternate old and new, in both orders, so that neither always runs first
                runs = {"baseline": [], "cached": []}
                for r in range(rounds):
                    for label in (("baseline", "cached") if r % 2 == 0 else ("cached", "baseline")):
                        result = _run_child(job("cached"), code_root if label == "baseline" else None)
                        print(_line(label, result), flush=True)
                        runs[label].append(result)
                results += [dict(_mean(runs["cached"])), dict(_mean(runs["baseline"]), path="baseline",
                                                                revision=baseline)]
            for path in paths:
                if baseline and path == "cached":
                    continue
                result = _run_child(job(path))
                print(_line(path, result), flush=True)
                results.append(result)
    table = _stage_table(results)
    if table:
        print(table)
    summary = {"bench": "model", "config": weights or config, "threads": threads, "cpu": platform.processor()
               or platform.machine(), "torch": torch.__version__, "results": results, "ratios": {}}
    for size in sizes:
        by = {r["path"]: r for r in results if r["size"] == size and "error" not in r}
        if "cached" not in by:
            continue
        base = by["cached"]
        ratios = {f"{p}_over_cached": round(by[p]["ms_per_frame"] / base["ms_per_frame"], 2) for p in by if p != "cached"}
        if "baseline" in by:
            ratios["baseline_over_cached_cpu"] = round(by["baseline"]["cpu_ms_per_frame"] / base["cpu_ms_per_frame"], 2)
        summary["ratios"][str(size)] = ratios
    return summary


def register_model_bench(bench_sub) -> None:
    p = bench_sub.add_parser("model", help="s/frame of the inference path vs the reference scan, no style cache, "
                                           "or an earlier revision")
    p.add_argument("--config", default="official", help="model config (default: official widths, random weights)")
    p.add_argument("--weights", help="weights folder instead of random weights")
    p.add_argument("--sizes", "--size", default="256,512", help="content sizes (square), comma-separated")
    p.add_argument("--frames", type=int, default=3, help="frames timed per fast path (1 for the slow paths)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--paths", default=",".join(PATHS), help=f"paths to time, comma-separated ({', '.join(PATHS)})")
    p.add_argument("--official", action="store_true", help="also time the official inference path (slow)")
    p.add_argument("--baseline", metavar="REV", help="also time `cached` with the model code of this git revision, "
                                                     "alternating with today's (e.g. HEAD~3)")
    p.add_argument("--rounds", type=int, default=2, help="alternating process pairs with --baseline (default 2)")
    p.add_argument("--profile", action="store_true", help="also CPU time by stage of one more `cached` frame "
                                                          "(and of the baseline's)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    paths = tuple(p.strip() for p in str(args.paths).split(",") if p.strip())
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise UserError(f"--paths: unknown path {unknown[0]!r}; choose from {', '.join(PATHS)}")
    if args.frames < 1 or args.rounds < 1:
        raise UserError("--frames and --rounds: must be at least 1")
    print(f"bench model: {args.weights or args.config}, sizes {sizes}, {args.threads} threads"
          + (f", baseline {args.baseline} ({args.rounds} rounds)" if args.baseline else ""))
    summary = run_model_bench(args.config, args.weights, sizes, args.frames, args.threads, args.official, paths,
                              args.baseline, args.rounds, args.profile)
    for size, ratios in summary["ratios"].items():
        print(f"  {size}²: " + ", ".join(f"{k} {v}×" for k, v in ratios.items()))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # a child of `_run_child`: one measurement, printed as the last line
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
