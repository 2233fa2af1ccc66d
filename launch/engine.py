"""DeepSpeed glue for `ldm train`: the engine config, safe checkpoint loading, activation
checkpointing, EMA weights, and MFU (the FLOP model is ``ldm.cost``). Model code never sees any of it.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from launch.configs import CONFIG_DIR
from ldm.checkpoint import fsync_path

# DeepSpeed picks its accelerator when first imported, and without CUDA logs a warning that it could not
# find one on every rank. This platform runs on CUDA or, without it, on the CPU (`dist.device_for`), so
# name the CPU for it; a DS_ACCELERATOR the user set stands.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# keys the trainer owns (set from the YAML config); a DeepSpeed JSON that sets them is an error
OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")


@dataclass(frozen=True)
class EngineConfig:
    deepspeed: str = "zero2"  # a name in launch/configs (zero0..zero3), a DeepSpeed JSON path, or "accelerate"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 (bf16 parameters, fp32 master weights)
    activation_checkpointing: bool = False
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the GPU, unknown on CPU


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA (DeepSpeed keeps bf16 parameters and fp32 master weights),
    ``fp32`` elsewhere; ``fp32`` / ``bf16`` stay as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"engine.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_switch(value: bool | str, device: torch.device, key: str) -> bool:
    """A true / false / auto config switch; ``auto`` means on for CUDA."""
    if value == "auto":
        return device.type == "cuda"
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be true, false or auto, got {value!r}")


def accelerate_deepspeed() -> tuple[dict[str, Any], str]:
    """The DeepSpeed settings `accelerate launch` passes in its environment (its DeepSpeed plugin:
    a ``deepspeed_config_file``, or ``zero_stage`` and offload devices)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED") != "true":
        raise ValueError("engine.deepspeed=accelerate needs `accelerate launch` with a DeepSpeed plugin config "
                         "(see launch/configs/accelerate-zero2.yaml)")
    if env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        path = env["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
        return _read_deepspeed_json(Path(path)), path
    zero: dict[str, Any] = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}
    for key, name in (("offload_optimizer", "OFFLOAD_OPTIMIZER_DEVICE"), ("offload_param", "OFFLOAD_PARAM_DEVICE")):
        device = env.get(f"ACCELERATE_DEEPSPEED_{name}", "none")
        if device != "none":
            zero[key] = {"device": device}
    return {"zero_optimization": zero}, "the accelerate config"


def _read_deepspeed_json(path: Path) -> dict[str, Any]:
    """A DeepSpeed JSON config; one that does not parse, or is not an object, is an error naming it."""
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"DeepSpeed config {path} must hold a JSON object, got {type(ds).__name__}")
    return ds


def deepspeed_config(cfg: EngineConfig, micro_batch: int, grad_accum: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed JSON (ZeRO stage etc.) plus what the trainer owns: batch sizes, clipping, bf16.
    Keys the trainer owns may appear in the JSON only as ``"auto"``."""
    if cfg.deepspeed == "accelerate":
        ds, path = accelerate_deepspeed()
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if mixed not in ("no", cfg.precision if cfg.precision == "bf16" else "no"):
            raise ValueError(f"accelerate asks for mixed precision {mixed!r} but engine.precision is "
                             f"{cfg.precision!r}; make them agree")
    else:
        path = Path(cfg.deepspeed)
        if not path.suffix:
            path = CONFIG_DIR / f"{cfg.deepspeed}.json"
        if not path.exists():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise FileNotFoundError(f"DeepSpeed config {cfg.deepspeed!r} not found (built-in: {known}, a .json path, "
                                    "or accelerate)")
        ds = _read_deepspeed_json(path)
    ds = {k: v for k, v in ds.items() if v != "auto"}
    clash = [k for k in OWNED_KEYS if k in ds]
    if clash:
        raise ValueError(f"{path} sets {clash}: these come from the training YAML (data.batch_size, "
                         "optim.grad_accum, optim.grad_clip, engine.precision, optim.*); remove them")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"engine.precision must be fp32 or bf16 here (resolve auto first), got {cfg.precision!r}")
    ds.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum,
              gradient_clipping=grad_clip, bf16={"enabled": cfg.precision == "bf16"})
    if clips_on_device(ds):  # `DeviceClip` takes the norm, clips and skips a non-finite step, without host reads
        ds["gradient_clipping"] = 0.0
        ds["zero_optimization"]["compute_grad_norm"] = False
        if cfg.precision == "bf16":
            ds["bf16"]["check_grad_overflow"] = False
    # DeepSpeed's throughput timer (on unless a config says otherwise) synchronizes the device at
    # the start of every forward and the end of every step, to time a rate it prints every
    # `steps_per_print` steps; `ldm train` logs its own rates without waiting for the GPU
    ds.setdefault("timers", {}).setdefault("throughput", {}).setdefault("enabled", False)
    return ds


def clips_on_device(ds: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config ``ds`` runs ZeRO-1/2's optimizer without optimizer offload: the
    trainer then takes the gradient norm, clips gradients and skips a non-finite step on the device
    (`DeviceClip`) instead of DeepSpeed, whose step reads the norm on the host."""
    zero = ds.get("zero_optimization", {})
    offload = zero.get("cpu_offload") or (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    return (zero.get("stage", 0) in (1, 2) and not offload and _knows("zero_optimization", "compute_grad_norm")
            and (not ds.get("bf16", {}).get("enabled") or _knows("bf16", "check_grad_overflow")))


def _knows(section: str, key: str) -> bool:
    """Whether this DeepSpeed's config has ``section.key`` (an older one refuses keys it does not know)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except ImportError:
        return False
    return key in {"bf16": DeepSpeedBF16Config, "zero_optimization": DeepSpeedZeroConfig}[section].model_fields


class DeviceClip:
    """The gradient norm, gradient clipping by it and the skip of a step whose norm is not finite,
    all on the device, for DeepSpeed's ZeRO-1/2 optimizer (`clips_on_device`).

    DeepSpeed 0.19's ZeRO-1/2 step reads the gradient norm on the host up to three times (bf16's
    overflow check, the norm's validity, the clip factor), and takes the norm one parameter tensor
    at a time (a copy to fp64 and a norm kernel each: ~1,300 kernels for DiT-XL, launched from
    Python). After the first read the GPU idles while the host queues the rest of the step (a GPU
    busy 78.5 % of an `ldm train` step on the H100). So DeepSpeed's norm, clipping and overflow
    check are off (`deepspeed_config`: ``compute_grad_norm: false``, ``gradient_clipping: 0``,
    ``bf16.check_grad_overflow: false``) and, before the fused AdamW that DeepSpeed steps, this
    takes the norm of the gradient that AdamW is about to apply (ZeRO's flat fp32 partition of this
    rank: one norm kernel, then a sum over the data-parallel ranks, as DeepSpeed's own norm), and
    gives AdamW the clip as ``grad_scale`` (the gradients are divided by it) and the skip as
    ``found_inf`` (no update, the step count kept): torch's fused kernels apply both on the device,
    as they do for ``torch.amp.GradScaler``. Every rank has the same norm, so all clip and skip
    alike. The clip factor is DeepSpeed's: gradients scaled by ``max_norm / (norm + 1e-6)`` when
    that is below 1.

    ``take()`` gives the last step's skip flag (1.0 when skipped, on the device) once; ``norm`` is
    the last step's gradient norm (a device tensor; read it when logging)."""

    def __init__(self, engine, max_norm: float):
        self.zero, self.max_norm = engine.optimizer, max_norm
        opt = _torch_optimizer(engine)
        if not all(g.get("fused") for g in opt.param_groups):
            raise ValueError("DeviceClip needs a fused torch optimizer (grad_scale / found_inf are fused-only)")
        if len(opt.param_groups) != 1:  # ZeRO steps each group on its own: a group's hook sees only its gradients
            raise ValueError(f"DeviceClip takes the norm of one parameter group, the optimizer has "
                             f"{len(opt.param_groups)}")
        if getattr(self.zero, "compute_grad_norm", False) or getattr(self.zero, "clip_grad", 0.0):
            raise ValueError("DeviceClip needs DeepSpeed's own norm and clipping off (deepspeed_config does that)")
        self.group = getattr(self.zero, "dp_process_group", None)
        self.skipped: torch.Tensor | None = None
        self.norm: torch.Tensor | None = None
        opt.register_step_pre_hook(self._before_step)

    def _before_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        square = torch.stack(torch._foreach_norm(grads)).float().square().sum()  # ZeRO-1/2: one flat tensor
        if torch.distributed.is_initialized() and torch.distributed.get_world_size(self.group) > 1:
            torch.distributed.all_reduce(square, group=self.group)  # this rank holds one partition of the gradient
        self.norm = norm = square.sqrt()
        bad = ~torch.isfinite(norm)
        opt.found_inf = self.skipped = bad.float()
        opt.grad_scale = (torch.where(bad, 1.0, ((norm + 1e-6) / self.max_norm).clamp(min=1.0))
                          if self.max_norm > 0 else None)

    def take(self) -> torch.Tensor | None:
        skipped, self.skipped = self.skipped, None
        return skipped


@contextlib.contextmanager
def run_clipping_kept(engine):
    """Around ``engine.load_checkpoint``: the gradient clipping stays this run's. A ZeRO-1/2
    checkpoint carries the clipping DeepSpeed ran with and loading it puts that back: one written by
    DeepSpeed's own clipping (``gradient_clipping`` > 0, before `DeviceClip`) would clip a second
    time on top of `DeviceClip`'s, and with ``compute_grad_norm: false`` DeepSpeed refuses to load
    it at all. The weights and AdamW's state load as written."""
    zero = engine.optimizer
    computes = getattr(zero, "compute_grad_norm", None)
    if computes is False:
        zero.compute_grad_norm = True  # only for the load's check of the checkpoint's clipping
    try:
        yield
    finally:
        if computes is False:
            zero.compute_grad_norm = False
        if hasattr(zero, "clip_grad"):
            zero.clip_grad = engine.gradient_clipping()


def quiet_deepspeed_deprecations() -> None:
    """Hide the FutureWarnings torch prints when DeepSpeed's ZeRO calls its collectives by their old
    names (``all_gather_into_tensor``, ``reduce_scatter_tensor``): once per rank and run, about
    DeepSpeed's code, nothing a user of `ldm train` can act on."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            r"is deprecated", category=FutureWarning)


def slow_engine_warning(ds: dict[str, Any], name: str) -> str | None:
    """Why the DeepSpeed config ``ds`` (named ``name``) will run slowly, or None."""
    if ds.get("bf16", {}).get("enabled") and ds.get("zero_optimization", {}).get("stage", 0) == 0:
        return (f"engine.deepspeed={name} runs ZeRO stage 0 with bf16: DeepSpeed's optimizer for that pair checks "
                "every gradient tensor for overflow on the host (a device sync per parameter tensor, every step); "
                "zero1 keeps the same memory on one GPU and checks once per step")
    return None


def safe_checkpoint_engine(config_params: Any):
    """DeepSpeed's torch checkpoint engine, but loading with ``torch.load(weights_only=True)``:
    only tensors, containers, primitives and an explicit allowlist of DeepSpeed's own plain types
    can come out of a checkpoint, never arbitrary pickled objects. It keeps the paths it saved
    until ``flush`` writes them to disk."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, fragment_address]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def __init__(self, config_params: Any):
            super().__init__(config_params)
            self.written: list[str] = []  # this process's files since the last `flush`

        def save(self, state_dict, path: str):
            super().save(state_dict, path)
            self.written.append(path)

        def flush(self) -> None:
            """This rank's files on disk (fsync), before rank 0 seals the checkpoint that holds them:
            only the writer's fsync flushes its node's cache (another node's fsync on a shared file
            system does not)."""
            for path in self.written:
                fsync_path(path)
            self.written = []

        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(config_params)


def skip_cpu_shm_kernel() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce kernel (for CPU
    inference) at start-up; training uses torch.distributed's collectives, so skip the compile
    (slow, and racy when several ranks build into one cache at once)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon module with ``torch.compile`` a no-op while it loads.

    DeepSpeed's ZeRO and bf16 optimizers import that module to ask whether their optimizer is
    Muon, and the module applies ``torch.compile`` to its functions at import, which loads
    inductor: about 3 CPU-seconds per rank, most of the start of a small run on CPUs. `ldm train`
    gives DeepSpeed its own AdamW, never Muon, so those functions are never called. The switch
    used, ``TORCHDYNAMO_DISABLE=1``, is read by ``torch.compile`` each time it wraps a function;
    dynamo is imported first, so its config keeps the user's environment, and the variable is
    restored at once: the model's own compilation (``model.compile``) is untouched. With a
    DeepSpeed that has no Muon module this does nothing."""
    import importlib

    import torch._dynamo  # noqa: F401  (its config read before the switch)

    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        importlib.import_module("deepspeed.runtime.zero.muon.original_muon")
    except ModuleNotFoundError:  # a DeepSpeed without Muon
        pass
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward (non-reentrant torch checkpointing)."""
    from torch.utils.checkpoint import checkpoint

    for blk in blocks:
        forward = blk.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        blk.forward = checkpointed


class EMA:
    """Exponential moving average of the model's weights in fp32, kept whole on every rank and
    updated with one fused multi-tensor op per step (``torch._foreach_lerp_``). Under ZeRO-3 the
    partitioned parameters are gathered for each update (simple, correct, and a cost of one
    all-gather per step; use a larger ``ema_every`` for big models)."""

    def __init__(self, module: nn.Module, decay: float, zero3: bool):
        self.decay, self.zero3 = decay, zero3
        self.names = [n for n, _ in module.named_parameters()]
        with self._gathered(module):
            self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    def _gathered(self, module: nn.Module):
        if not self.zero3:
            import contextlib
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        with self._gathered(module):
            shadow, params = [self.shadow[n] for n in self.names], [p.detach() for p in module.parameters()]
            if all(p.dtype == torch.float32 for p in params):
                torch._foreach_lerp_(shadow, params, 1.0 - self.decay)
            else:  # bf16 weights added into the fp32 average as they are: no fp32 copy of the model per step
                torch._foreach_mul_(shadow, self.decay)
                torch._foreach_add_(shadow, params, alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.names) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        device = next(iter(self.shadow.values())).device if self.shadow else None
        self.shadow = {n: state[n].to(device=device, dtype=torch.float32).clone() for n in self.names}


# Dense bf16 peak TFLOP/s per device, for MFU (vendor datasheets).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def peak_flops(cfg: EngineConfig) -> float | None:
    """Peak FLOP/s of one device: the config's value, else a known GPU's, else None (CPU)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tf in PEAK_TFLOPS.items():
            if key in name:
                return tf * 1e12
    return None


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    return None if not peak or not math.isfinite(flops_per_s) else flops_per_s / peak


# ------------------------------------------------------------------------------------------
# Topology-independent ("universal") training state: full fp32 weights and Adam moments by
# parameter name, gathered from whatever ZeRO stage / number of ranks wrote them, and scattered
# back into whatever stage / number of ranks reads them. Plain safetensors + JSON, no pickle.
# ------------------------------------------------------------------------------------------
MOMENTS = ("exp_avg", "exp_avg_sq")


def _torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO / bf16 optimizers keep it as ``.optimizer``)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _check_universal_support(engine) -> None:
    if type(engine.optimizer).__name__ == "BF16_Optimizer":
        raise NotImplementedError("universal (topology-independent) checkpoints are not supported for ZeRO stage 0 "
                                  "with bf16 (DeepSpeed's BF16_Optimizer); use ZeRO 1-3 for bf16 runs")


def gather_universal(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full fp32 weights + Adam moments (``<moment>.<param name>``) and the optimizer step count.
    A collective: every rank must call it; the tensors are whole on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _check_universal_support(engine)
    tensors: dict[str, torch.Tensor] = {}
    opt = _torch_optimizer(engine)
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is not None:  # ZeRO-1/2/3 or DeepSpeed's bf16 optimizer: fp32 master partitions
            moments = {m: safe_get_full_optimizer_state(p, m) for m in MOMENTS}
        else:  # ZeRO-0 in fp32: the torch optimizer holds the parameter itself
            full, state = p.detach(), opt.state.get(p, {})
            moments = {m: state.get(m, torch.zeros_like(p)) for m in MOMENTS}
        tensors[f"param.{name}"] = full.detach().float().cpu().clone()
        for m, v in moments.items():
            tensors[f"{m}.{name}"] = v.detach().float().cpu().clone()
    steps = {float(s["step"]) for s in opt.state.values() if "step" in s}
    return tensors, {"adam_step": max(steps) if steps else 0.0}


def scatter_universal(engine, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Load ``gather_universal``'s output into an engine of any ZeRO stage and world size."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _check_universal_support(engine)
    opt = _torch_optimizer(engine)
    # a fresh engine has no Adam state yet: create it as AdamW would, for the tensors the torch
    # optimizer steps (ZeRO-3 keeps its fp32 flat partitions outside the param groups between steps)
    owned = [q for group in opt.param_groups for q in group["params"]]
    owned += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)

    def adam_step(q: torch.Tensor, value: float) -> torch.Tensor:
        """AdamW's step count as it keeps it: on the parameter's device for fused kernels, else the CPU."""
        return torch.tensor(float(value), device=q.device if on_device else "cpu")

    for q in owned:
        if not opt.state[q]:
            opt.state[q].update(step=adam_step(q, 0.0), exp_avg=torch.zeros_like(q), exp_avg_sq=torch.zeros_like(q))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)  # ZeRO-1/2, bf16 optimizer
    if link is not None:
        link()
    for name, p in engine.module.named_parameters():
        full = tensors[f"param.{name}"]
        if hasattr(p, "ds_id"):  # ZeRO-3: the low-precision shard too, re-partitioned from the gathered copy
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                p.data.copy_(full.to(p.dtype))
        else:
            with torch.no_grad():
                p.data.copy_(full.to(p.device, p.dtype))
        if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, full.to(p.device))
            for m in MOMENTS:
                safe_set_full_optimizer_state(p, tensors[f"{m}.{name}"].to(p.device), m)
        else:
            state = opt.state[p]
            for m in MOMENTS:
                state[m] = tensors[f"{m}.{name}"].to(p.device).clone()
            state["step"] = adam_step(p, meta["adam_step"])
    for q, state in opt.state.items():  # the step count of every (flat or per-parameter) state
        if "step" in state:
            state["step"] = adam_step(q, meta["adam_step"]) if torch.is_tensor(state["step"]) else meta["adam_step"]


@contextlib.contextmanager
def deepspeed_patches_undone() -> Iterator[None]:
    """Undo, when the block ends, what DeepSpeed changes process-wide: ZeRO-3 replaces
    ``torch.nn.functional.linear`` with its memory-efficient version and keeps it "unless manually
    reset" (its ``memory_efficient_linear``). Code that runs after a trainer in the same process (an
    evaluation, a notebook, the next test) then gets PyTorch's own again; TorchScript, for one, fails
    on DeepSpeed's."""
    linear = torch.nn.functional.linear
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
