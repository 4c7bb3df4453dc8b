"""Step-time and memory overhead of the DNQ callbacks vs plain training, measured in one process.

For each model, fits of ``plain``, ``recorder`` (statistics only), ``weight`` (+ differential weight noise)
and ``dnq`` (+ activation noise) alternate ``--repeats`` times; each fit runs ``--steps`` optimizer steps on
synthetic data already on the device and the per-step time (forward, backward, optimizer step and every
callback hook) is recorded after ``--warmup`` steps. A fit's time is the *mean* step time over a window of
``--steps`` steps; the default window is one statistics period (``--stats-every``), so it holds exactly one
refresh step and the refresh cost is amortised as in training, not hidden by a median.

Estimators, robust to a shared, noisy machine: ``ratio`` is the median over repeats of the *paired* ratio
dnq/plain (the two fits that ran next to each other in time), ``ratio_min`` the ratio of the fastest fits.
Also reported: the median step time per variant and the extra memory the callbacks hold. One JSON line per
model is printed and all results are written to ``--out``.

    python benchmarks/overhead.py                       # CPU: CIFAR ResNet-20 @32 px b128, resnet50 @64 px b32
    python benchmarks/overhead.py --device cuda         # GPU: + resnet50 @224 px b128, bf16
    python benchmarks/overhead.py --summarize benchmarks/results/overhead/cpu   # the folder's summary.md

Results go to ``benchmarks/results/overhead/<cpu|gpu>/<date>_<models>_<variants>.json`` (``--out`` to choose),
and the folder's generated ``summary.md`` is rewritten.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.profilers import Profiler  # noqa: E402

from flatq_lightning import dnq_callbacks  # noqa: E402
from flatq_lightning.app.models import create_model  # noqa: E402
from flatq_lightning.callbacks.sam import SAM  # noqa: E402


class StepTimer(Callback):
    """Time from the first batch-start hook to the last batch-end hook of each optimizer step.

    On a GPU: wall time with the device synchronised. On the CPU: the process's CPU time (user + system),
    which, with one intra-op thread, counts the step's own work and not the time other processes on a shared
    machine held the cores; wall time is kept too.
    """

    def __init__(self, sync: bool) -> None:
        self.sync = sync
        self.times: list[float] = []
        self.wall: list[float] = []
        self._t0 = self._w0 = 0.0

    def _now(self) -> float:
        return time.perf_counter() if self.sync else time.process_time()

    def start(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._t0, self._w0 = self._now(), time.perf_counter()

    def stop(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(self._now() - self._t0)
        self.wall.append(time.perf_counter() - self._w0)


class _Start(Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.timer.start()


class _End(Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.timer.stop()


class LM(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, sam: bool = False) -> None:
        super().__init__()
        self.model = model
        self.sam = sam

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        kw = dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
        if self.sam:  # the SAM baseline: two forward/backward passes per step
            return SAM(self.parameters(), torch.optim.SGD, rho=0.05, **kw)
        return torch.optim.SGD(self.parameters(), **kw)


class DeviceBatches(torch.utils.data.IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, n: int) -> None:
        self.x, self.y, self.n = x, y, n

    def __iter__(self):
        for _ in range(self.n):
            yield self.x, self.y


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) dict/list/tuple."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _noise_pool_bytes(cb: Callback) -> int:
    """The pre-drawn noise pool of a noise callback (its public ``noise_memory_bytes()``)."""
    return cb.noise_memory_bytes()


def callback_bytes(cbs: list[Callback]) -> dict[str, int]:
    """Bytes held by the callbacks: weight side (statistics, pool, applied noise) and activation side.

    From the callbacks' public state (Lightning's ``state_dict()``): the recorder's statistics (``weight_*`` keys
    on the weight side, ``act_*`` on the activation side) and the weight-noise callback's applied noise
    (``applied``: the coefficients it must remove next step); plus the noise pools (``noise_memory_bytes()``).
    """
    from flatq_lightning.callbacks import (
        ActivationNoiseInjection,
        DifferentialNoiseInjection,
        QuantErrorRecorder,
    )

    weight, act = 0, 0
    for c in cbs:
        if isinstance(c, QuantErrorRecorder):
            for key, stats in c.state_dict().items():
                if key.startswith("act_"):
                    act += _tensor_bytes(stats)
                elif key.startswith("weight_"):
                    weight += _tensor_bytes(stats)
        elif isinstance(c, DifferentialNoiseInjection):
            applied = c.state_dict().get("applied") or {}
            weight += _noise_pool_bytes(c) + _tensor_bytes([applied.get("a"), applied.get("b")])
        elif isinstance(c, ActivationNoiseInjection):
            act += _noise_pool_bytes(c)
    return {"weight_side": weight, "act_side": act}


class HookProfile(Profiler):
    """CPU time spent inside the DNQ callbacks' hooks, per optimizer step (CPU runs only: on a GPU the hooks
    only enqueue kernels). Keys: ``weight_update`` (the noise callback's batch-end: the differential swap, and
    the weight-statistics refresh every ``stats_every`` steps), ``act_stats`` (the recorder's input hooks and
    batch-end: input statistics on refresh steps; in the ``recorder`` variant, where no noise callback owns the
    weight refresh, the weight statistics too), ``act_noise`` (the activation-noise pre-hooks' forward work).
    What the callbacks add outside their hooks (the backward through the noisy inputs, memory traffic) is the
    rest of the measured overhead.

    Public APIs only. The batch-end hooks are timed as a Lightning :class:`Profiler` (the Trainer's ``profiler``:
    Lightning names each callback hook ``[Callback]<state_key>.<hook>``). The forward pre-hooks on the recorder's
    layers (``recorder.modules``) are bracketed by timing pre-hooks: ``before`` (first in the callback list)
    appends a marker before the DNQ callbacks register theirs, ``after`` (last) prepends a start marker and
    appends an end marker once they have. So each layer runs: start, the recorder's hook (it registers with
    ``prepend=True``), the marker, the activation noise's hook, end; start→marker is ``act_stats``,
    marker→end ``act_noise``.
    """

    def __init__(self, timer: StepTimer, cbs: list[Callback]) -> None:
        super().__init__()
        from flatq_lightning.callbacks import DifferentialNoiseInjection, QuantErrorRecorder

        self.timer = timer
        self.bins: dict[str, dict[int, float]] = {}
        self.actions: dict[str, str] = {}
        for c in cbs:
            key = "weight_update" if isinstance(c, DifferentialNoiseInjection) else (
                "act_stats" if isinstance(c, QuantErrorRecorder) else None)
            if key:
                self.actions[f"[Callback]{c.state_key}.on_train_batch_end"] = key
        self.recorder = next((c for c in cbs if isinstance(c, QuantErrorRecorder) and c.record_activations), None)
        self._t0: dict[str, float] = {}
        self._layer_t0 = 0.0
        self.before, self.after = _HookBracket(self, first=True), _HookBracket(self, first=False)

    def _add(self, key: str, seconds: float) -> None:
        step = len(self.timer.times)
        d = self.bins.setdefault(key, {})
        d[step] = d.get(step, 0.0) + seconds

    # Lightning's Profiler interface -------------------------------------------------------------------------
    def start(self, action_name: str) -> None:
        if action_name in self.actions:
            self._t0[action_name] = time.process_time()

    def stop(self, action_name: str) -> None:
        t0 = self._t0.pop(action_name, None)
        if t0 is not None:
            self._add(self.actions[action_name], time.process_time() - t0)

    def summary(self) -> str:
        return ""

    # the forward pre-hook markers ----------------------------------------------------------------------------
    def _start_hook(self, module, args):
        self._layer_t0 = time.process_time()

    def _marker_hook(self, module, args):
        now = time.process_time()
        self._add("act_stats", now - self._layer_t0)
        self._layer_t0 = now

    def _end_hook(self, module, args):
        self._add("act_noise", time.process_time() - self._layer_t0)

    def per_step(self, warmup: int, steps: int) -> dict[str, float]:
        return {k: sum(v for s, v in d.items() if warmup <= s < warmup + steps) / steps for k, d in self.bins.items()}


class _HookBracket(Callback):
    """Registers :class:`HookProfile`'s timing pre-hooks at ``on_train_start`` (``first``: before the DNQ
    callbacks register theirs; else after) and removes them at ``on_train_end``."""

    def __init__(self, profile: HookProfile, first: bool) -> None:
        self.profile, self.first = profile, first
        self.handles: list[Any] = []

    def on_train_start(self, trainer, pl_module):
        p = self.profile
        if p.recorder is None:
            return
        for module in p.recorder.modules.values():
            if self.first:
                self.handles.append(module.register_forward_pre_hook(p._marker_hook))
            else:
                self.handles.append(module.register_forward_pre_hook(p._start_hook, prepend=True))
                self.handles.append(module.register_forward_pre_hook(p._end_hook))

    def on_train_end(self, trainer, pl_module):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def run_fit(name, make_model, x, y, variant, steps, warmup, precision, device, stats_every, timer_sync):
    torch.manual_seed(0)
    lm = LM(make_model(), sam=variant == "sam")
    timer = StepTimer(timer_sync)
    cbs: list[Callback] = []
    if variant == "recorder":
        cbs = dnq_callbacks("w4a4", stats_every=stats_every, weight_noise=False, act_noise=False)
    elif variant == "weight":
        cbs = dnq_callbacks("w4a4", stats_every=stats_every, act_noise=False)
    elif variant == "dnq":
        cbs = dnq_callbacks("w4a4", stats_every=stats_every)
    profile = HookProfile(timer, cbs if device == "cpu" else [])
    trainer = pl.Trainer(
        accelerator=device,
        devices=1,
        max_steps=steps + warmup,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[profile.before, _Start(timer), *cbs, _End(timer), profile.after],
        profiler=profile,
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loader = torch.utils.data.DataLoader(DeviceBatches(x, y, steps + warmup), batch_size=None)
    trainer.fit(lm, loader)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    mem = callback_bytes(cbs)
    param_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    window = timer.times[warmup:]
    return sum(window) / len(window), mem, param_bytes, peak, profile.per_step(warmup, len(window))


def paired_ratio(times: dict[str, list[float]], v: str) -> float | None:
    """Median over repeats of ``times[v][r] / times["plain"][r]``: the fits that ran side by side in time."""
    if v not in times:
        return None
    return round(statistics.median(t / p for t, p in zip(times[v], times["plain"])), 3)


def fastest_ratio(times: dict[str, list[float]], v: str) -> float | None:
    return round(min(times[v]) / min(times["plain"]), 3) if v in times else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default=None, help="comma list of name:res:batch (default per device)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stats-every", type=int, default=16)
    ap.add_argument("--variants", default="plain,recorder,weight,dnq", help="any of plain,recorder,weight,dnq,sam")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU default 1: CPU time per step is then meaningful)")
    ap.add_argument("--out", default=None,
                    help="result JSON (default: benchmarks/results/overhead/<cpu|gpu>/<date>_<models>_<variants>.json)")
    ap.add_argument("--summarize", metavar="DIR", default=None, help="only (re)write DIR/summary.md from its JSON files")
    args = ap.parse_args()
    if args.summarize:
        print(write_summary(Path(args.summarize)).read_text())
        return
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)

    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore")
    cuda = args.device == "cuda"
    if args.models:
        specs = [(m.split(":")[0], int(m.split(":")[1]), int(m.split(":")[2])) for m in args.models.split(",")]
    elif cuda:
        specs = [("cifar_resnet20", 32, 128), ("resnet50", 224, 128)]
    else:
        specs = [("cifar_resnet20", 32, 128), ("resnet50", 64, 32)]
    steps = args.steps or (max(40, args.stats_every) if cuda else args.stats_every)
    precision = "bf16-mixed" if cuda else "32-true"
    variants = args.variants.split(",")
    machine = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    results = []
    for name, res, bs in specs:
        nc = 10 if name.startswith("cifar") else 1000
        dev = torch.device("cuda" if cuda else "cpu")
        x = torch.randn(bs, 3, res, res, device=dev)
        y = torch.randint(0, nc, (bs,), device=dev)

        def make_model(name=name, nc=nc):
            return create_model(name, num_classes=nc)

        times: dict[str, list[float]] = {v: [] for v in variants}
        profiles: dict[str, dict[str, list[float]]] = {}
        mem: dict[str, dict[str, int]] = {}
        peaks: dict[str, int | None] = {}
        param_bytes = 0
        for r in range(args.repeats):
            order = variants if r % 2 == 0 else list(reversed(variants))
            for v in order:
                t, m, param_bytes, peak, prof = run_fit(
                    name, make_model, x, y, v, steps, args.warmup, precision, args.device, args.stats_every, cuda
                )
                times[v].append(t)
                for k, sec in prof.items():
                    profiles.setdefault(v, {}).setdefault(k, []).append(sec)
                mem[v] = m
                peaks[v] = peak
                print(f"  {name} repeat {r} {v:<9} {t * 1000:8.1f} ms/step", file=sys.stderr, flush=True)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        paired = functools.partial(paired_ratio, times)
        fastest = functools.partial(fastest_ratio, times)
        row = {
            "model": name,
            "resolution": res,
            "batch": bs,
            "device": machine,
            "precision": precision,
            "timer": "cuda-synchronised wall time" if cuda else f"process CPU time, {torch.get_num_threads()} thread(s)",
            "stats_every": args.stats_every,
            "steps": steps,
            "repeats": args.repeats,
            "plain_ms": round(med["plain"] * 1000, 2),
            "dnq_ms": round(med.get("dnq", float("nan")) * 1000, 2),
            "ratio": paired("dnq"),
            "ratio_min": fastest("dnq"),
            "ratio_recorder": paired("recorder"),
            "ratio_weight_noise": paired("weight"),
            "ratio_sam": paired("sam"),
            "ratio_sam_min": fastest("sam"),
            "estimator": "median over repeats of the paired per-fit ratio; a fit's time is its mean step time over one statistics period",
            "extra_mem_mb": round(mem.get("weight", mem.get("dnq", {"weight_side": 0}))["weight_side"] / 2**20, 3),
            "extra_mem_pct_of_params": round(100 * mem.get("weight", mem.get("dnq", {"weight_side": 0}))["weight_side"] / param_bytes, 2),
            "act_noise_mem_mb": round(mem.get("dnq", {"act_side": 0})["act_side"] / 2**20, 3),
            "param_mb": round(param_bytes / 2**20, 2),
            "peak_mem_mb": {v: (round(p / 2**20, 1) if p else None) for v, p in peaks.items()},
            "all_ms": {v: [round(t * 1000, 2) for t in ts] for v, ts in times.items()},
            # CPU ms per step inside the callbacks' hooks (median over repeats), see HookProfile
            "hook_ms": {v: {k: round(statistics.median(ts) * 1000, 2) for k, ts in d.items()} for v, d in profiles.items()},
        }
        results.append(row)
        print(json.dumps({k: row[k] for k in ("model", "plain_ms", "dnq_ms", "ratio", "ratio_min", "extra_mem_mb")}), flush=True)
    print()
    print(markdown(results))
    out = Path(args.out or default_out(args.device, specs, variants))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "results": results}, indent=2))
    print(f"\n{out}; summary of its folder: {write_summary(out.parent)}")


def markdown(results: list[dict[str, Any]]) -> str:
    """One table row per model, then the CPU time inside the hooks per variant."""
    lines = [
        "| model | res | batch | plain ms | recorder | + weight noise | DNQ (w+a) ms | ratio (paired median) | ratio (fastest) | SAM | weight-side extra MB (% params) | device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        r = {k: "—" if v is None else v for k, v in row.items()}  # older files lack some keys
        r = {k: r.get(k, "—") for k in ("model", "resolution", "batch", "plain_ms", "ratio_recorder", "ratio_weight_noise",
                                        "dnq_ms", "ratio", "ratio_min", "ratio_sam", "extra_mem_mb",
                                        "extra_mem_pct_of_params", "device")}
        for k in ("ratio_recorder", "ratio_weight_noise", "ratio", "ratio_min", "ratio_sam"):
            r[k] = f"{r[k]}x" if r[k] != "—" else r[k]
        lines.append(
            f"| {r['model']} | {r['resolution']} | {r['batch']} | {r['plain_ms']} | {r['ratio_recorder']} | "
            f"{r['ratio_weight_noise']} | {r['dnq_ms']} | {r['ratio']} | {r['ratio_min']} | {r['ratio_sam']} | {r['extra_mem_mb']} ({r['extra_mem_pct_of_params']}%) | {r['device']} |"
        )
    lines.append("")
    for r in results:
        for v, d in r.get("hook_ms", {}).items():
            parts = ", ".join(f"{k} {ms} ms ({100 * ms / r['plain_ms']:.1f}% of plain)" for k, ms in d.items())
            lines.append(f"- {r['model']} {v}: inside the hooks per step: {parts}")
    return "\n".join(lines).rstrip() + "\n"


def default_out(device: str, specs: list[tuple[str, int, int]], variants: list[str]) -> Path:
    """``benchmarks/results/overhead/<cpu|gpu>/<date>_<models>_<variants>.json``: named by what it holds."""
    models = "+".join(f"{n.removeprefix('cifar_')}@{res}" for n, res, _ in specs)
    kinds = "+".join(v for v in variants if v != "plain") or "plain"
    folder = "gpu" if device == "cuda" else "cpu"
    return Path("benchmarks/results/overhead") / folder / f"{time.strftime('%Y-%m-%d')}_{models}_{kinds}.json"


def write_summary(folder: Path) -> Path:
    """``<folder>/summary.md``: every result file of the folder (oldest first) with its date, command and table."""
    folder = Path(folder)
    parts = [f"# Overhead results in `{folder.as_posix()}`", "",
             f"Generated by `python benchmarks/overhead.py --summarize {folder.as_posix()}` from the JSON files beside "
             "it (one per run; the `.log` beside a JSON is that run's output). What the columns mean: "
             "`benchmarks/overhead.py`, docs/results.md section 1.", ""]
    for f in sorted(folder.glob("*.json")):
        doc = json.loads(f.read_text())
        parts += [f"## `{f.name}`", "", f"{doc.get('date', '?')}: `python {doc.get('command', '?')}`", "",
                  markdown(doc.get("results", []))]
    path = folder / "summary.md"
    path.write_text("\n".join(parts))
    return path


if __name__ == "__main__":
    main()
