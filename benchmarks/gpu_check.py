"""One-call GPU check of VGG16-SSD300 training on a single GPU (issue 17): JSON + markdown in $OUT.

    make gpu-check                                   # on the GPU machine: <= 8 minutes
    OUT=/tmp/gc .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --dry   # tiny sizes on the CPU (tests/test_gpu_check.py)
    .venv/bin/python benchmarks/gpu_check.py --stage model   # one stage, as the driver runs it

Stages, each a subprocess of this script under its own time limit (``min(cap, budget left)``; a
stage that would get less than its minimum is skipped), in this order:

``env``
    machine, library versions, ``nvidia-smi``, and what of issue 17 is wired in ``ssd/`` now
    (``train.augment_on``, ``ssd.device_augment``, ``train.compile``): feature-detected from
    the source, never assumed.
``model``
    model-bound training throughput, ours (``build_model(load_config("ssd300_vgg16",
    ["model.backbone_weights=none"]))`` driven by ``ssd.engine.StepRunner.step``) vs torchvision's
    ``ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21)``, both channels_last,
    same autocast, batch 32 and 64, fp32 (TF32 convolutions, PyTorch's default) and bf16; the
    same starting weights and the timing loop of ``bench_gpu_train.py`` (interleaved, CUDA events),
    FLOPs per image counted once with ``FlopCounterMode`` on the real step, peak memory per side
    (``torch.cuda.max_memory_allocated``), MFU against the GPU's dense peak
    (``bench_gpu_train.PEAK_FLOPS``, or ``GPU_CHECK_PEAK_TFLOPS``).
``shards``
    VOC-sized JPEG shards (the synthetic scenes of ``ssd.data.synthetic.render_sample`` drawn at
    375..500 px a side, JPEG q90) under ``$GPU_CHECK_WORK`` (``pipelines/make_shards.py
    synthetic`` has no image-size option: its images are 128..256 px, too cheap to decode).
``e2e``
    the real loader (``ShardLoader(ShardStream(..., build_transform(...)))``, as
    ``ssd.training`` builds it) feeding ``StepRunner.step``, loader workers 0 / 4 / 8 / N-2: images/s,
    the share of wall time spent waiting for the next batch, the fraction of the model-bound rate;
    device augmentation when ``ssd/`` has it (else recorded as not available).
``learn``
    ~90 s of steps on one fixed batch of 16 shard images: the loss must fall (last quarter below
    70 % of the first quarter).
``ray``
    ``pipelines/train.py --workers 1 --gpu --address local --no-mlflow``, one epoch on the shards.
``compile``
    ``torch.compile`` of the step, eager vs compiled images/s, if time is left.

Results: ``$OUT/gpu_check.json`` (rewritten after every stage, so a killed run keeps what it
measured; a stage's own partial results are in ``$OUT/stages/<stage>.json``, its output in
``$OUT/logs/<stage>.log``) and ``$OUT/gpu_check.md``. ``OUT`` defaults to
``benchmarks/results/gpu_check/``. A stage's failure is recorded (status ``failed`` /
``timeout`` / ``partial``, the log's tail) and the next stage runs; the exit status is 0 unless
the driver itself breaks.

Environment: ``OUT``; ``GPU_CHECK_WORK`` (scratch: shards, Ray's run folder; default
``/tmp/gpu_check_work``); ``GPU_CHECK_BUDGET`` (seconds for all stages, default 465);
``GPU_CHECK_DRY=1`` (= ``--dry``); ``GPU_CHECK_PEAK_TFLOPS`` (dense peak for the dtype measured,
if the GPU is not in the table); ``GPU_CHECK_SKIP`` (comma-separated stages to skip).

Dry mode: CPU, tiny sizes (the ``tiny`` preset for e2e/learn/ray, batch 2 for the VGG16 sides,
a few dozen images, ``torch.compile`` with the ``eager`` backend): it checks that every stage
still runs against the current ``ssd/``, not any figure. Without ``--dry`` and without a CUDA
device the script prints "skipped: no CUDA device" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "results" / "gpu_check"
DEFAULT_WORK = Path("/tmp/gpu_check_work")
NAME = "gpu_check"

#: (stage, cap seconds, minimum seconds) on the GPU, in run order; a stage runs under
#: min(cap, budget left - RESERVE_S) and is skipped when that is under its minimum
STAGES: tuple[tuple[str, int, int], ...] = (
    ("env", 60, 10),
    ("model", 150, 45),
    ("shards", 90, 15),
    ("e2e", 150, 30),
    ("learn", 130, 40),
    ("ray", 180, 60),
    ("compile", 150, 60),
)
#: dry mode (CPU): every stage, generous caps for a loaded 2-core machine
DRY_CAPS: dict[str, int] = {
    "env": 60, "model": 120, "shards": 60, "e2e": 90, "learn": 60, "ray": 180, "compile": 120,
}
STAGE_NAMES = tuple(s for s, _, _ in STAGES)
#: seconds kept for the summary
RESERVE_S = 10
DEFAULT_BUDGET_S = 465
#: stages that need the shards
NEEDS_SHARDS = ("e2e", "learn", "ray")
#: the issue's FLOP figures per 300x300 image (21 classes), kept beside the counted ones
DRAFT_FWD_GFLOP, DRAFT_TRAIN_GFLOP = 62.7, 188.0


# --------------------------------------------------------------------------------- helpers
def is_dry() -> bool:
    return os.environ.get("GPU_CHECK_DRY", "0") not in ("", "0")


def out_dir() -> Path:
    out = os.environ.get("OUT")
    return Path(out) if out else DEFAULT_OUT


def work_dir() -> Path:
    return Path(os.environ.get("GPU_CHECK_WORK") or DEFAULT_WORK)


def dump(path: Path, obj: Any) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err)[:400]}"


class StageResult(dict):
    """A stage's result dict, written to ``$OUT/stages/<stage>.json`` at every ``save()``."""

    def __init__(self, stage: str) -> None:
        super().__init__(stage=stage, dry=is_dry(), errors=[])
        self.path = out_dir() / "stages" / f"{stage}.json"

    def save(self) -> None:
        dump(self.path, self)

    def error(self, where: str, err: BaseException) -> None:
        traceback.print_exc()
        self["errors"].append(f"{where}: {error_text(err)}")
        self.save()


def device_and_amp():
    """(device, the bf16 dtype or None): cuda unless dry; bf16 where the GPU has it."""
    import torch

    if is_dry():
        return torch.device("cpu"), torch.bfloat16
    device = torch.device("cuda", torch.cuda.current_device())
    return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else None


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_overrides(num_classes: int | None = None) -> list[str]:
    """Our model from scratch (no weight file on the GPU machine), NHWC as training runs it."""
    out = ["model.backbone_weights=none", "train.channels_last=true"]
    return out + ([f"model.num_classes={num_classes}"] if num_classes else [])


def stage_limit() -> float:
    """This stage's time limit, as the driver set it (inf when run by hand)."""
    return float(os.environ.get("GPU_CHECK_STAGE_LIMIT") or "inf")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def loader_worker_counts() -> list[int]:
    """0 (load in the training process, train.py's default), 4, 8, all cores but two."""
    if is_dry():
        return [0, 1]
    return sorted({0, 4, 8, max(1, cpu_count() - 2)})


# ----------------------------------------------------------------------------------- env
def feature_status() -> dict[str, Any]:
    """What of issue 17 the current ``ssd/`` has, found by reading it (others are changing it)."""
    import importlib
    import inspect

    out: dict[str, Any] = {}
    try:
        from ssd.config import load_config

        train = load_config("tiny").train
        out["train.augment_on_field"] = getattr(train, "augment_on", "not available")
        out["train.compile_field"] = getattr(train, "compile", "not available")
    except Exception as err:  # noqa: BLE001 - recorded
        out["config"] = f"not available: {error_text(err)}"
    try:
        module = importlib.import_module("ssd.device_augment")
        out["device_augment"] = "importable: " + ", ".join(
            n for n, v in vars(module).items()
            if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module.__name__
        )
    except Exception as err:  # noqa: BLE001
        out["device_augment"] = f"not available: {error_text(err)}"
    for module_name, key, needle in (
        ("ssd.training", "augment_on_wired_in_training", "augment_on"),
        ("ssd.engine", "compile_wired_in_engine", "train.compile"),
        ("ssd.training", "compile_wired_in_training", "train.compile"),
    ):
        try:
            source = inspect.getsource(importlib.import_module(module_name))
            out[key] = needle in source
        except Exception as err:  # noqa: BLE001
            out[key] = f"not available: {error_text(err)}"
    return out


def stage_env(result: StageResult) -> None:
    import torch
    from _common import library_version, machine_info

    device, _ = device_and_amp()
    result["machine"] = machine_info(torch.get_num_threads(), str(device))
    result["library_commit"] = library_version()
    result["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    result["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    result["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    if device.type == "cuda":
        result["bf16_supported"] = torch.cuda.is_bf16_supported()
        result["capability"] = list(torch.cuda.get_device_capability(device))
    result.save()
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit,memory.total",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=False)
        result["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        result["nvidia_smi"] = f"not available: {error_text(err)}"
    result["features"] = feature_status()
    result.save()
    print(json.dumps(result, indent=2, default=str))


# --------------------------------------------------------------------------------- model
def peak_for(device, amp: str) -> tuple[float | None, str, str | None]:
    """(dense peak FLOP/s or None, dtype key, where it came from)."""
    import torch
    from bench_gpu_train import compute_dtype_key, peak_flops

    key = compute_dtype_key(amp, device)
    if os.environ.get("GPU_CHECK_PEAK_TFLOPS"):
        return float(os.environ["GPU_CHECK_PEAK_TFLOPS"]) * 1e12, key, "GPU_CHECK_PEAK_TFLOPS"
    if device.type != "cuda":
        return None, key, None
    peak, entry = peak_flops(torch.cuda.get_device_name(device), key)
    return peak, key, (f"bench_gpu_train.PEAK_FLOPS[{entry!r}]" if peak else None)


def side_steps(runner, tv, tv_opt, ours_batch, tv_batch, amp_dtype, losses):
    """The two training steps that ``bench_gpu_train.time_steps`` interleaves: ours
    (``StepRunner.step``) and torchvision's (same autocast, SGD, ``loss.item()``)."""
    import torch

    def ours_step():
        # the step returns device tensors; float() reads it, as the peer reads loss.item()
        # (bench_gpu_train.py does the same)
        losses["ours"].append(float(runner.step(*ours_batch)["loss"]))

    def peer_step():
        if amp_dtype is None:
            loss = sum(tv(*tv_batch).values())
        else:
            with torch.autocast(runner.device.type, dtype=amp_dtype):
                loss = sum(tv(*tv_batch).values())
        tv_opt.zero_grad(set_to_none=True)
        loss.backward()
        tv_opt.step()
        losses["peer"].append(loss.item())

    return ours_step, peer_step


def stage_model(result: StageResult) -> None:
    import torch
    from _common import stats
    from bench_gpu_train import SIZE, count_flops, make_batch, side_summary, time_steps
    from bench_train_step import check_same_network, sgd, tv_to_ours_state
    from torchvision.models.detection import ssd300_vgg16

    from ssd.config import load_config
    from ssd.engine import StepRunner
    from ssd.models import build_model

    dry = is_dry()
    device, bf16 = device_and_amp()
    batches = [1] if dry else [32, 64]
    # dry: one precision (a VGG16 step takes seconds on a small CPU), autocast's path
    amps = ["bf16"] if dry else ["none"] + (["bf16"] if bf16 is not None else [])
    warmup, repeats = (0, 1) if dry else (3, 10)
    result.update(device=str(device), batches=batches, amps=amps, warmup=warmup, repeats=repeats,
                  channels_last=True, timer="cuda events" if device.type == "cuda" else "perf_counter",
                  configs=[])
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    torch.manual_seed(0)
    cfg = load_config("ssd300_vgg16", base_overrides())
    ours = build_model(cfg).train()
    tv = ssd300_vgg16(weights=None, weights_backbone=None, num_classes=21).train()
    if dry:  # tests/test_bench_gpu_train.py checks it; here it would double the dry stage
        result["equivalence"] = "not checked (dry)"
    else:
        try:
            result["equivalence"] = check_same_network(ours, tv)  # CPU, fp32
        except Exception as err:  # noqa: BLE001 - timing still means something; recorded
            result.error("check_same_network", err)
    ours.load_state_dict(tv_to_ours_state(tv.state_dict(), ours.state_dict()))
    tv.transform.image_mean = list(cfg.augment.mean)
    tv.transform.image_std = list(cfg.augment.std)
    ours.to(device)
    tv.to(device=device, memory_format=torch.channels_last)
    ours_opt, tv_opt = sgd(ours), sgd(tv)
    flops_per_image: dict[str, float] = {}
    result.save()

    for amp in amps:
        amp_dtype = bf16 if amp == "bf16" else None
        runner = StepRunner(ours, cfg, ours_opt, None, device, amp_dtype)
        # StepRunner may switch it on (a global flag: torchvision's side runs with it too)
        result["cudnn_benchmark"] = torch.backends.cudnn.benchmark
        for batch in batches:
            entry: dict[str, Any] = {"batch": batch, "amp": amp}
            try:
                images, boxes, labels = make_batch(batch, 8, 0, device)
                ours_targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
                tv_images = list(images.float().div_(255))
                tv_targets = [{"boxes": b * SIZE, "labels": lab} for b, lab in zip(boxes, labels)]
                losses: dict[str, list[float]] = {"ours": [], "peer": []}
                ours_step, peer_step = side_steps(
                    runner, tv, tv_opt, (images, ours_targets), (tv_images, tv_targets), amp_dtype, losses
                )

                # first step of each side: FLOPs counted once (they do not depend on the dtype),
                # peak memory of one step per side
                counted = {}
                for side, fn in (("ours", ours_step), ("peer", peer_step)):
                    if side in flops_per_image:
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        fn()
                        sync(device)
                        mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                    else:
                        flops, mem = count_flops(fn, device)
                        flops_per_image[side] = flops / batch
                        result["flops_per_image"] = dict(flops_per_image)
                    counted[side] = (int(flops_per_image[side] * batch), mem)
                samples = time_steps(ours_step, peer_step, repeats, warmup, 1, device)
                peak, key, source = peak_for(device, amp)
                entry.update(peak_flops=peak, dtype_key=key, peak_source=source)
                for side in ("ours", "peer"):
                    rate = stats([batch / s for s in samples[side]], "images/s")
                    entry[side] = side_summary(samples[side], rate, batch, *counted[side], peak)
                    values = losses[side]
                    entry[side]["loss_first_last"] = [values[0], values[-1]]
                    if not all(map(math.isfinite, values)):
                        result["errors"].append(f"B={batch} {amp} {side}: non-finite loss")
                entry["ratio_ours_over_tv"] = entry["ours"]["images_per_s"] / entry["peer"]["images_per_s"]
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: recorded, next config
                entry["error"] = error_text(err)
                result.error(f"B={batch} {amp}", err)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["configs"].append(entry)
            result.save()
            print({k: v for k, v in entry.items() if k not in ("ours", "peer")}, flush=True)
    if flops_per_image:
        result["flops_per_image_gflop"] = {k: v / 1e9 for k, v in flops_per_image.items()}
        result["draft_gflop_per_image"] = {"forward": DRAFT_FWD_GFLOP, "train": DRAFT_TRAIN_GFLOP}
    result.save()


# -------------------------------------------------------------------------------- shards
def _render_one(task: tuple[int, int, int, int]) -> tuple[str, bytes, dict[str, Any]]:
    """One VOC-sized sample: (key, JPEG bytes, the shard JSON)."""
    import io

    import numpy as np
    from PIL import Image

    index, seed, min_size, max_size = task
    from ssd.data.synthetic import render_sample

    image, target = render_sample(index, seed=seed, min_size=min_size, max_size=max_size)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(buf, format="JPEG", quality=90)
    n = len(target["labels"])
    meta = {
        "boxes": target["boxes"].tolist(),
        "labels": target["labels"].tolist(),
        "difficult": [False] * n,
        "truncated": [bool(t) for t in target.get("truncated", [False] * n)],
        "iscrowd": [False] * n,
        "width": int(image.shape[2]),
        "height": int(image.shape[1]),
        "image_id": index,
        "source": "gpu_check",
    }
    return f"{index:08d}", buf.getvalue(), meta


def shard_plan() -> dict[str, Any]:
    if is_dry():
        return {"train": 24, "val": 8, "min_size": 96, "max_size": 128, "shard_size": 8}
    return {"train": 2560, "val": 256, "min_size": 375, "max_size": 500, "shard_size": 256}


def stage_shards(result: StageResult) -> None:
    import multiprocessing

    from ssd.data.shards import DATASET_JSON, FORMAT_NAME, FORMAT_VERSION, ShardWriter, content_hash
    from ssd.data.synthetic import CLASSES

    plan = shard_plan()
    root = work_dir() / "shards"
    result.update(plan=plan, path=str(root), source="ssd.data.synthetic.render_sample at VOC size, JPEG q90")
    marker = root / "plan.json"
    if load(marker) == plan and all((root / s / DATASET_JSON).is_file() for s in ("train", "val")):
        result["reused"] = True
        result.save()
        return
    workers = max(1, cpu_count() - 1)
    offset = 0
    for split in ("train", "val"):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("shard-*.tar"):
            old.unlink()
        writer = ShardWriter(folder, max_samples=plan["shard_size"])
        tasks = [(offset + i, 17, plan["min_size"], plan["max_size"]) for i in range(plan[split])]
        offset += plan[split]
        start = time.perf_counter()
        if workers > 1 and len(tasks) > 64:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for key, jpg, meta in pool.imap(_render_one, tasks, chunksize=16):
                    writer.write(key, jpg, meta)
        else:
            for task in tasks:
                writer.write(*_render_one(task))
        entries = writer.close()
        info = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "classes": list(CLASSES),
            "shards": entries, "num_samples": sum(e["samples"] for e in entries),
            "source": {"type": "gpu-check-synthetic-voc-sized"},
            "content_hash": content_hash(list(CLASSES), entries),
        }
        dump(folder / DATASET_JSON, info)
        result[split] = {
            "samples": info["num_samples"], "seconds": round(time.perf_counter() - start, 2),
            "mean_jpeg_kib": round(sum(e["bytes"] for e in entries) / max(1, info["num_samples"]) / 1024, 1),
        }
        result.save()
    dump(marker, plan)
    result["reused"] = False
    result.save()


def open_shards(split: str):
    from ssd.data.shards import ShardSet

    return ShardSet.open(work_dir() / "shards" / split)


# ----------------------------------------------------------------------------------- e2e
def train_preset() -> str:
    return "tiny" if is_dry() else "ssd300_vgg16"


def build_runner(num_classes: int, amp_dtype, device, extra: list[str] | None = None):
    import torch

    from ssd.config import load_config
    from ssd.engine import StepRunner, build_optimizer
    from ssd.models import build_model

    cfg = load_config(train_preset(), base_overrides(num_classes) + (extra or []))
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    return cfg, StepRunner(model, cfg, build_optimizer(model, cfg.optim), None, device, amp_dtype)


def train_transform(cfg):
    """The training transform exactly as ``ssd.training`` builds it (uint8 out)."""
    from ssd.transforms import build_transform

    return build_transform(cfg.priors.image_size, cfg.augment.strength, train=True,
                           mean=cfg.augment.mean, normalize=False)


def stage_e2e(result: StageResult) -> None:
    from ssd.data.streaming import ShardLoader, ShardStream

    dry = is_dry()
    device, bf16 = device_and_amp()
    amp_dtype = None if dry else bf16
    batch = 4 if dry else 32
    seconds = 1.0 if dry else 6.0
    shards = open_shards("train")
    cfg, runner = build_runner(shards.num_classes, amp_dtype, device)
    tf = train_transform(cfg)
    result.update(preset=train_preset(), batch=batch, amp="bf16" if amp_dtype else "none",
                  seconds_per_case=seconds, train_images=shards.num_samples, cores=cpu_count(),
                  strength=cfg.augment.strength, cases=[])
    result["features"] = feature_status()
    make_device_loader = device_loader_factory(result)
    result.save()

    # the model alone on one real batch, for the ratio
    images, targets = next(iter(ShardLoader(ShardStream(shards, tf, train=True, seed=0), batch, num_workers=0)))
    for _ in range(1 if dry else 3):
        runner.step(images, targets)
    sync(device)
    n = 2 if dry else 15
    t0 = time.perf_counter()
    for _ in range(n):
        runner.step(images, targets)
    sync(device)
    result["model_only_images_per_s"] = n * batch / (time.perf_counter() - t0)
    result.save()

    kinds = ["cpu"] + (["device"] if make_device_loader is not None else [])
    for kind in kinds:
        for workers in loader_worker_counts():
            if kind == "device":
                loader = lambda w=workers: make_device_loader(shards, cfg, batch, w, device)
            else:
                loader = lambda w=workers: ShardLoader(
                    ShardStream(shards, tf, train=True, seed=0), batch, num_workers=w,
                    pin_memory=device.type == "cuda")
            entry = {"augment": kind, "loader_workers": workers,
                     **e2e_case(loader, runner, seconds, device)}
            if "error" in entry:
                result["errors"].append(f"augment={kind} loader_workers={workers}: {entry['error']}")
            else:
                entry["fraction_of_model_bound"] = (
                    entry["steady_images_per_s"] / result["model_only_images_per_s"])
            result["cases"].append(entry)
            result.save()
            print(entry, flush=True)


def device_loader_factory(result: dict[str, Any]):
    """``(shards, cfg, batch, workers, device) -> loader`` with the augmentation on the device,
    built as ``ssd.training`` builds it (``ssd.device_augment``); None (recorded in
    ``result``) where the current ``ssd/`` does not have it."""
    import inspect

    try:
        from ssd.data.streaming import ShardLoader, ShardStream
        from ssd.device_augment import DeviceAugment, DeviceAugmentLoader

        if "prepare" not in inspect.signature(ShardStream).parameters:
            raise TypeError("ShardStream has no 'prepare' argument")
    except Exception as err:  # noqa: BLE001 - recorded
        result["device_augmentation"] = f"not available: {error_text(err)}"
        return None

    def build(shards, cfg, batch, workers, device):
        augment = DeviceAugment(cfg.priors.image_size, cfg.augment.strength, tuple(cfg.augment.mean))
        stream = ShardStream(shards, train=True, seed=0, prepare=augment.prepare)
        loader = ShardLoader(stream, batch, num_workers=workers, pin_memory=device.type == "cuda")
        return DeviceAugmentLoader(loader, augment, device)

    result["device_augmentation"] = (
        "measured: ssd.device_augment.DeviceAugmentLoader as ssd.training builds it (loader "
        "workers read JPEG bytes and draw the parameters; decoding and augmenting on the device "
        "count as waiting for data)")
    return build


def e2e_case(make_loader, runner, seconds: float, device, min_batches: int = 3) -> dict[str, Any]:
    """``seconds`` (and at least ``min_batches``) of steps fed by a fresh loader: images/s and
    the share of wall time spent in ``next(loader)``, overall and after the first batch (worker
    start-up excluded)."""
    try:
        loader = make_loader()
        count = steady = 0
        wait = steady_wait = 0.0
        first_batch = None
        epochs = 0
        c0 = time.process_time()
        t0 = steady_t0 = time.perf_counter()
        batches = 0

        def more() -> bool:
            return time.perf_counter() - t0 < seconds or batches < min_batches

        while more():
            loader.set_epoch(epochs)
            it = iter(loader)
            before = batches
            while more():
                tw = time.perf_counter()
                try:
                    images, targets = next(it)
                except StopIteration:
                    break
                waited = time.perf_counter() - tw
                wait += waited
                if first_batch is None:
                    first_batch = time.perf_counter() - t0
                    steady_t0 = time.perf_counter()
                else:
                    steady_wait += waited
                    steady += images.shape[0]
                runner.step(images, targets)
                count += images.shape[0]
                batches += 1
            if hasattr(it, "close"):
                it.close()  # stops this epoch's DataLoader workers now
            epochs += 1
            if batches == before:
                raise RuntimeError("an epoch of the loader yielded no batch")
        sync(device)
        wall = time.perf_counter() - t0
        steady_wall = max(time.perf_counter() - steady_t0, 1e-9)
        return {
            "images": count, "epochs_started": epochs, "wall_s": wall, "first_batch_s": first_batch,
            "images_per_s": count / wall, "steady_images_per_s": steady / steady_wall,
            "data_wait_share": wait / wall, "steady_data_wait_share": steady_wait / steady_wall,
            "main_process_cpu_ms_per_image": 1e3 * (time.process_time() - c0) / max(count, 1),
        }
    except Exception as err:  # noqa: BLE001 - recorded, next case
        traceback.print_exc()
        return {"error": error_text(err)}


# --------------------------------------------------------------------------------- learn
def stage_learn(result: StageResult) -> None:
    from ssd.data.streaming import ShardLoader, ShardStream

    dry = is_dry()
    device, bf16 = device_and_amp()
    amp_dtype = None if dry else bf16
    batch = 8 if dry else 16
    seconds = float(os.environ.get("GPU_CHECK_LEARN_SECONDS") or (2 if dry else 90))
    # leave the stage time to start, build the model and write its result
    seconds = min(seconds, max(5.0, stage_limit() - 30))
    shards = open_shards("train")
    cfg, runner = build_runner(shards.num_classes, amp_dtype, device)
    images, targets = next(iter(ShardLoader(ShardStream(shards, train_transform(cfg), train=True, seed=1),
                                            batch, num_workers=0)))
    images = images.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    result.update(preset=train_preset(), batch=batch, amp="bf16" if amp_dtype else "none",
                  seconds=seconds, lr=runner.optimizer.param_groups[0]["lr"], schedule="constant",
                  steps=[])
    log: list[list[float]] = result["steps"]
    t0 = time.perf_counter()
    last_save = t0
    min_steps = 8 if dry else 30
    while time.perf_counter() - t0 < seconds or len(log) < min_steps:
        metrics = runner.step(images, targets)
        log.append([len(log), round(time.perf_counter() - t0, 3), float(metrics["loss"])])
        if time.perf_counter() - last_save > 5:
            result.save()
            last_save = time.perf_counter()
    losses = [row[2] for row in log]
    k = max(1, len(losses) // 4)
    first, last = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    result.update(n_steps=len(losses), loss_first_quarter=first, loss_last_quarter=last,
                  loss_fell=bool(last < 0.7 * first), criterion="last quarter < 0.7 x first quarter")
    if len(log) > 400:  # keep the JSON small: every n-th step
        every = len(log) // 200 + 1
        result["steps"] = log[::every] + ([log[-1]] if (len(log) - 1) % every else [])
        result["steps_kept_every"] = every
    if not result["loss_fell"] and not dry:
        result["errors"].append(f"loss did not fall: {first:.3f} -> {last:.3f}")
    result.save()
    print({k: v for k, v in result.items() if k != "steps"})


# ----------------------------------------------------------------------------------- ray
def stage_ray(result: StageResult) -> None:
    dry = is_dry()
    work = work_dir()
    summary = out_dir() / "stages" / "ray_summary.json"
    summary.unlink(missing_ok=True)
    name = f"gpu-check-{os.getpid()}"
    cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "--data", str(work / "shards"),
           "--workers", "1", "--address", "local", "--no-mlflow", "--storage-path", str(work / "runs"),
           "--name", name, "--epochs", "1", "--keep-checkpoints", "1", "--log-every", "10",
           "--summary-json", str(summary)]
    if dry:
        cmd += ["--config", "tiny", "--cpu", "--cpus-per-worker", "1", "--loader-workers", "0",
                "train.batch_size=8"]
    else:
        cpus = max(2, min(8, cpu_count() - 2))
        cmd += ["--config", "ssd300_vgg16", "--gpu", "--cpus-per-worker", str(cpus),
                "--loader-workers", str(cpus - 1), "model.backbone_weights=none"]
    cmd += ["train.eval_every=1"]
    feats = feature_status()
    result.update(command=" ".join(cmd), augment_on_wired=feats.get("augment_on_wired_in_training"),
                  compile_wired=feats.get("compile_wired_in_engine"))
    result.save()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
    result.update(rc=proc.returncode, seconds=time.perf_counter() - start)
    data = load(summary)
    if data is not None:
        result["summary"] = data
    if proc.returncode != 0:
        result["errors"].append(f"pipelines/train.py exited {proc.returncode} (see logs/ray.log)")
    result.save()
    import shutil

    shutil.rmtree(work / "runs" / name, ignore_errors=True)


# ------------------------------------------------------------------------------- compile
def stage_compile(result: StageResult) -> None:
    import torch

    dry = is_dry()
    device, bf16 = device_and_amp()
    amp_dtype = None if dry else bf16
    batch = 2 if dry else 64
    n = 2 if dry else 15
    feats = feature_status()
    wired = feats.get("compile_wired_in_engine") is True
    # not wired, dry: dynamo tracing only (the eager backend needs no C++ toolchain)
    backend = "inductor (StepRunner's torch.compile)" if wired else "eager" if dry else "inductor"
    from bench_gpu_train import make_batch

    shards_classes = 21
    cfg, eager = build_runner(shards_classes, amp_dtype, device)
    _, boxes, labels = make_batch(batch, 8, 0, device)
    size = cfg.priors.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    targets = [{"boxes": b, "labels": lab} for b, lab in zip(boxes, labels)]
    result.update(preset=train_preset(), batch=batch, amp="bf16" if amp_dtype else "none",
                  backend=backend, train_compile_wired=wired,
                  how=("train.compile=true through StepRunner" if wired else
                       "torch.compile(runner.model) (train.compile is not wired in ssd.engine)"))

    def rate(runner, steps):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            runner.step(images, targets)
        sync(device)
        return steps * batch / (time.perf_counter() - t)

    eager.step(images, targets)
    result["eager_images_per_s"] = rate(eager, n)
    result.save()
    del eager  # one model on the device at a time
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if wired:
        _, compiled = build_runner(shards_classes, amp_dtype, device, ["train.compile=true"])
    else:
        _, compiled = build_runner(shards_classes, amp_dtype, device)
        compiled.model = torch.compile(compiled.model, backend=backend)
    t = time.perf_counter()
    for _ in range(3):
        compiled.step(images, targets)
    sync(device)
    result["compile_and_first_steps_s"] = time.perf_counter() - t
    result.save()
    result["compiled_images_per_s"] = rate(compiled, n)
    result["speedup"] = result["compiled_images_per_s"] / result["eager_images_per_s"]
    result.save()
    print(result)


STAGE_FUNCTIONS = {
    "env": stage_env, "model": stage_model, "shards": stage_shards, "e2e": stage_e2e,
    "learn": stage_learn, "ray": stage_ray, "compile": stage_compile,
}


def run_stage_here(stage: str) -> int:
    """The body of ``--stage NAME`` (a child of the driver): 0 ok, 1 an exception (recorded)."""
    import torch

    if is_dry():
        torch.set_num_threads(min(2, torch.get_num_threads()))
    result = StageResult(stage)
    result.save()
    try:
        STAGE_FUNCTIONS[stage](result)
    except Exception as err:  # noqa: BLE001 - recorded; the driver reads rc and the JSON
        result.error("stage", err)
        return 1
    return 0


# -------------------------------------------------------------------------------- driver
def run_child(stage: str, limit: float, log: Path) -> tuple[int | None, bool]:
    """Run ``--stage`` in its own process group; (rc, timed out). On timeout the whole group
    gets SIGTERM, then SIGKILL 15 s later (DataLoader workers and Ray's processes included)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--stage", stage],
                                cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, GPU_CHECK_STAGE_LIMIT=str(int(limit))))
        try:
            return proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return proc.returncode, True


def log_tail(log: Path, lines: int = 4) -> str:
    try:
        tail = log.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return " | ".join(line.strip()[:200] for line in tail)


def fmt(value: Any, digits: int = 1, pct: bool = False) -> str:
    if value is None or isinstance(value, str):
        return "n/a" if value is None else value
    return f"{100 * value:.{digits}f}%" if pct else f"{value:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: stages, then one table per stage that measured something."""
    stages = report["stages"]
    res = {name: (s.get("result") or {}) for name, s in stages.items()}
    machine = res["env"].get("machine", {})
    lines = [
        f"# gpu_check{' (dry run: CPU, tiny sizes, no figure means anything)' if report['dry'] else ''}",
        "",
        (f"{report['date']}, commit {report.get('library_commit', '?')}; "
        f"{machine.get('gpu', machine.get('device', '?'))}, {machine.get('cores', '?')} cores "
        f"({machine.get('cpu', '?')}), torch {machine.get('torch', '?')}, CUDA {machine.get('cuda', 'n/a')}; "
        f"total {fmt(report.get('seconds'), 0)} s of a {report['budget_s']} s budget."),
        "",
        "| stage | status | seconds | limit s | note |",
        "|---|---|---:|---:|---|",
    ]
    for name, s in stages.items():
        note = str(s.get("note", "")).replace("|", "/")
        lines.append(f"| {name} | {s['status']} | {fmt(s.get('seconds'), 0)} | {s.get('limit_s', '')} | {note} |")

    model = res["model"]
    if model.get("configs"):
        fl = model.get("flops_per_image_gflop", {})
        lines += [
            "", "## Model-bound training throughput (ours vs torchvision, channels_last, interleaved)", "",
            (f"FLOPs per training image (FlopCounterMode, forward + backward, counted once): ours "
            f"{fmt(fl.get('ours'))} GFLOP, torchvision {fmt(fl.get('peer'))} GFLOP (issue's figure "
            f"{DRAFT_TRAIN_GFLOP:g})."), "",
            ("| batch | precision | ours img/s | tv img/s | ours / tv | ours MFU | tv MFU | peak (TFLOP/s, dtype) "
            "| peak mem GiB ours / tv |"),
            "|---:|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for c in model["configs"]:
            if "error" in c:
                lines.append(f"| {c['batch']} | {c['amp']} | error: {c['error'][:100]} | | | | | | |")
                continue
            o, p = c["ours"], c["peer"]
            peak = f"{c['peak_flops'] / 1e12:g}, {c['dtype_key']}" if c.get("peak_flops") else f"unknown, {c['dtype_key']}"
            lines.append(
                f"| {c['batch']} | {c['amp']} | {o['images_per_s']:.1f} | {p['images_per_s']:.1f} "
                f"| **{c['ratio_ours_over_tv']:.2f}x** | {fmt(o['mfu'], pct=True)} | {fmt(p['mfu'], pct=True)} "
                f"| {peak} | {fmt(o['peak_memory_gib'], 2)} / {fmt(p['peak_memory_gib'], 2)} |")

    e2e = res["e2e"]
    if e2e.get("cases"):
        lines += [
            "", (f"## End to end: ShardLoader + StepRunner ({e2e.get('preset')}, batch {e2e.get('batch')}, "
            f"{e2e.get('amp')}, VOC-sized JPEGs)"), "",
            (f"Model-bound on one real batch: {fmt(e2e.get('model_only_images_per_s'))} img/s. "
            f"Device augmentation: {e2e.get('device_augmentation')}."), "",
            ("| augmentation | loader workers | img/s (steady) | of model-bound | waiting for data (steady) | first batch s "
            "| main-process CPU ms/img |"),
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in e2e["cases"]:
            if "error" in c:
                lines.append(f"| {c['augment']} | {c['loader_workers']} | error: {c['error'][:100]} | | | | |")
                continue
            lines.append(
                f"| {c['augment']} | {c['loader_workers']} | {c['steady_images_per_s']:.1f} | {fmt(c['fraction_of_model_bound'], pct=True)} "
                f"| {fmt(c['steady_data_wait_share'], pct=True)} | {fmt(c['first_batch_s'], 2)} "
                f"| {fmt(c['main_process_cpu_ms_per_image'], 2)} |")

    learn = res["learn"]
    if "loss_fell" in learn:
        lines += ["", "## Learning check (one fixed batch)", "",
                  (f"{learn['preset']}, batch {learn['batch']}, {learn['amp']}, lr {learn['lr']:g} constant, "
                  f"{learn['n_steps']} steps in {learn['seconds']:g} s: loss {learn['loss_first_quarter']:.3f} "
                  f"(first quarter) -> {learn['loss_last_quarter']:.3f} (last quarter); "
                  f"fell: **{'yes' if learn['loss_fell'] else 'no'}** ({learn['criterion']}).")]
    ray = res["ray"]
    if ray:
        summ = ray.get("summary") or {}
        keys = [k for k in ("status", "epochs", "images_per_s", "mAP", "AP50", "seconds", "wall_s") if k in summ]
        lines += ["", "## Ray Train: pipelines/train.py --workers 1, one epoch", "",
                  f"rc {ray.get('rc')}, {fmt(ray.get('seconds'), 0)} s; summary: "
                  + (", ".join(f"{k} {summ[k]}" for k in keys) if keys else
                     ("keys " + ", ".join(sorted(summ)[:12]) if summ else "none")),
                  f"`{ray.get('command', '')}`"]
    comp = res["compile"]
    if "eager_images_per_s" in comp:
        lines += ["", "## torch.compile", "",
                  (f"{comp['how']}, backend {comp['backend']}, batch {comp['batch']}, {comp['amp']}: eager "
                  f"{comp['eager_images_per_s']:.1f} img/s, compiled {fmt(comp.get('compiled_images_per_s'))} img/s "
                  f"(x{fmt(comp.get('speedup'), 2)}); compile + 3 steps {fmt(comp.get('compile_and_first_steps_s'))} s.")]
    errors = [f"{name}: {e}" for name, r in res.items() for e in r.get("errors", [])]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {e[:300]}" for e in errors]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    for name, stage in report["stages"].items():
        stage["result"] = load(out / "stages" / f"{name}.json")
    dump(out / f"{NAME}.json", report)
    (out / f"{NAME}.md").write_text(markdown(report))


def drive(dry: bool) -> int:
    out = out_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(exist_ok=True)
    for old in (out / "stages").glob("*.json"):
        old.unlink()
    budget = float(os.environ.get("GPU_CHECK_BUDGET", DEFAULT_BUDGET_S))
    skip = {s.strip() for s in os.environ.get("GPU_CHECK_SKIP", "").split(",") if s.strip()}
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": NAME,
        "dry": dry,
        "command": "python benchmarks/gpu_check.py" + (" --dry" if dry else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "budget_s": budget,
        "out": str(out),
        "work": str(work_dir()),
        "stages": {name: {"status": "pending"} for name in STAGE_NAMES},
    }
    write_report(report, out)
    for name, cap, minimum in STAGES:
        stage = report["stages"][name]
        left = budget - (time.perf_counter() - t0) - RESERVE_S
        limit = int(min(DRY_CAPS[name] if dry else cap, left))
        stage["limit_s"] = limit
        if name in skip:
            stage.update(status="skipped", note="GPU_CHECK_SKIP")
        elif name in NEEDS_SHARDS and report["stages"]["shards"]["status"] not in ("ok", "partial"):
            stage.update(status="skipped", note="no shards (the shards stage did not finish)")
        elif limit < (min(minimum, 10) if dry else minimum):
            stage.update(status="skipped", note=f"budget: {int(left)} s left, needs {minimum} s")
        else:
            print(f"[gpu_check {time.perf_counter() - t0:5.0f}s] {name}: start (limit {limit} s)", flush=True)
            stage["status"] = "running"
            write_report(report, out)
            log = out / "logs" / f"{name}.log"
            start = time.perf_counter()
            rc, timed_out = run_child(name, limit, log)
            stage.update(rc=rc, seconds=round(time.perf_counter() - start, 1), log=str(log.relative_to(out)))
            errors = (load(out / "stages" / f"{name}.json") or {}).get("errors", [])
            if timed_out:
                stage.update(status="timeout", note=f"stopped at {limit} s; partial results kept")
            elif rc != 0:
                stage.update(status="failed", note=(errors[-1] if errors else log_tail(log))[:300])
            elif errors:
                stage.update(status="partial", note=f"{len(errors)} error(s); first: {errors[0][:240]}")
            else:
                stage.update(status="ok", note="")
        print(f"[gpu_check {time.perf_counter() - t0:5.0f}s] {name}: {stage['status']} {stage.get('note', '')}",
              flush=True)
        report["library_commit"] = ((load(out / "stages" / "env.json") or {}).get("library_commit")
                                    or report.get("library_commit"))
        report["seconds"] = time.perf_counter() - t0
        write_report(report, out)
    report["seconds"] = time.perf_counter() - t0
    write_report(report, out)
    print("\n" + (out / f"{NAME}.md").read_text())
    print(f"wrote {out / (NAME + '.json')} and {out / (NAME + '.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (= GPU_CHECK_DRY=1)")
    parser.add_argument("--stage", choices=STAGE_NAMES, help="run one stage here (the driver's child)")
    args = parser.parse_args(argv)
    if args.dry:
        os.environ["GPU_CHECK_DRY"] = "1"
    sys.path.insert(0, str(BENCH_DIR))  # _common, bench_gpu_train (also in a --stage child)
    if args.stage:
        return run_stage_here(args.stage)
    if not is_dry():
        import torch

        if not torch.cuda.is_available():
            print("skipped: no CUDA device (gpu_check needs a GPU; `--dry` or GPU_CHECK_DRY=1 runs "
                  "every stage at tiny sizes on the CPU)")
            return 0
    return drive(is_dry())


if __name__ == "__main__":
    sys.exit(main())
