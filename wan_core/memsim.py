"""A simulated GPU: run the real code at real shapes on a fake ``cuda`` device and count bytes.

Nothing here needs a GPU or allocates the memory it counts. Under PyTorch's
``FakeTensorMode`` a tensor is only metadata (shape, dtype, strides, device), so a 14B DiT
"exists" in a few MB of RAM and every kernel only computes its output's metadata. Three
modes stacked for a :class:`FakeGPU` session make the real ``wan_core`` code run there:

- ``FakeTensorMode``: every tensor is fake; ``device="cuda"`` works on the CPU-only wheel.
- :class:`_CudaShim` (a ``TorchFunctionMode``): the CPU-only wheel has no CUDA device guard,
  so the Python bindings that open one (``t[...]``, ``t[...] = v``, ``t.to(...)``,
  ``t.copy_(...)``, ``t.contiguous()``) fail on a fake cuda tensor; the shim sends them
  straight to the aten ops (``slice``/``select``/``_to_copy``/``copy_``/``clone``), which is
  what they run on a real GPU, and keeps ``param.data = copy`` moving the parameter's device.
  It also sends ``F.scaled_dot_product_attention`` on cuda to the fused kernel CUDA picks
  (flash for fp16/bf16 with head_dim <= 256, else memory-efficient), whose fake kernels
  return the real outputs (the float32 log-sum-exp rows included) instead of the CPU
  math path's full score matrix.
- :class:`DeviceMemory` (a ``TorchDispatchMode``): the tracker. Every op's output tensors
  on the device are recorded by their *storage* (views share it, so nothing is counted
  twice); a ``weakref.finalize`` on the storage subtracts its bytes when the last tensor
  using it dies. ``current`` is the live device bytes, ``peak`` the high-water mark.
  Data-dependent scalars (``bool(t.all())``, ``t.tolist()``) get a stand-in (True / 1)
  so the real control flow runs (which is why the DiT step drives ``sample``'s model
  function through the Euler sampler: UniPC's ``sigma < 1`` check would read the stand-in).
  ``explain = True`` keeps the op and the live storages at the peak, for diagnosis.

What it does not model (add a margin for it): allocator rounding and fragmentation (the
CUDA caching allocator rounds to 512 B / 2 MiB blocks and may not reuse a freed block),
the CUDA context (~300-500 MB outside PyTorch's allocator), cuBLAS / cuDNN workspaces
(convolution algorithms may ask for hundreds of MB), memory held back by
``record_stream`` while a side-stream copy is in flight, and kernel workspaces in general:
those of the attention backends are added by the formula of
:func:`attention_workspace_bytes`.

Use::

    with FakeGPU() as gpu:
        dit = fake_dit(KNOWN_DIT["T2V-14B"], "fp8_e4m3fn")
        with gpu.stage("DiT step"):
            ...real code on "cuda"...
    gpu.peaks   # {"DiT step": bytes}
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_map_only

from .fp8 import WEIGHT_DTYPES

__all__ = ["DeviceMemory", "FakeGPU", "Stage", "SimJob", "fake_module", "fake_dit", "fake_vae", "fake_text_encoder",
           "fake_clip_vision", "attention_workspace_bytes", "storage_dtype_rule", "simulate_text_encoder",
           "simulate_clip", "simulate_vae_encode", "simulate_dit_step", "simulate_vae_decode", "simulate_run",
           "fake_vae22", "sim_latent_shape", "simulate_image_encode22"]

aten = torch.ops.aten
_HALF = (torch.float16, torch.bfloat16)
_DATA = torch._C.TensorBase.__dict__["data"]   # the ``Tensor.data`` descriptor
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- the tracker


class DeviceMemory(TorchDispatchMode):
    """Live bytes of tensor storages on ``device_type``, from the ops that create them.

    ``current``: bytes alive now; ``peak``: the most alive at once since the last
    :meth:`reset_peak`. A storage is counted once (at its full size) from the op that first
    returns a tensor on it until Python frees its last tensor.
    """

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type
        self.current = 0
        self.peak = 0
        self.allocations = 0       # storages seen, for tests
        self._live: dict[int, int] = {}   # id(storage) -> bytes
        self.explain = False       # keep (op, live storage sizes) at the peak, for diagnosis
        self.at_peak: tuple[str, list[tuple[int, str]]] | None = None
        self._op = ""
        self._desc: dict[int, str] = {}

    def reset_peak(self) -> None:
        self.peak = self.current

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._desc.pop(key, None)

    def _record(self, t: Tensor) -> None:
        # a wrapper subclass (DTensor: FSDP2's sharded parameters) has no storage of its own;
        # its local tensor is counted by the op that made it
        if t.device.type != self.device_type or is_traceable_wrapper_subclass(t):
            return
        storage = t.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        old = self._live.get(key)
        if old is None:
            self.allocations += 1
            if self.explain:
                self._desc[key] = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
            weakref.finalize(storage, self._free, key)
        self._live[key] = nbytes          # a resize_ changes a known storage's size
        self.current += nbytes - (old or 0)
        if self.current > self.peak:
            self.peak = self.current
            if self.explain:
                self.at_peak = (self._op, sorted(((n, self._desc.get(k, "")) for k, n in self._live.items()),
                                                 reverse=True))

    def resized(self, storage) -> None:
        """A known storage changed size outside any op (``UntypedStorage.resize_``, which FSDP2
        uses to free and re-allocate gathered parameters): count its new size."""
        key = id(storage)
        if key in self._live:
            nbytes = storage.nbytes()
            self.current += nbytes - self._live[key]
            self._live[key] = nbytes
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            # A fake tensor has no values: answer "all finite" / "1" so the real control flow
            # (non-finite checks, token counts) runs on. Only memory is measured here.
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1 if not dtype.is_floating_point else 1.0)
        out = func(*args, **kwargs)
        if self.explain:
            import traceback

            frames = traceback.extract_stack(limit=12)[::-1]
            self._op = f"{func} at " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.name}:{f.lineno}"
                                                   for f in frames if "wan_core" in f.filename)
        tree_map_only(Tensor, self._record, out)
        return out


# --------------------------------------------------------------------------- the cuda shim


def _index_view(t: Tensor, index) -> Tensor:
    """Basic indexing (ints, slices, None, Ellipsis) through aten view ops."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, (Tensor, list, bool)) for i in index):
        raise NotImplementedError("memsim: advanced (tensor/list/bool) indexing of a fake cuda tensor is not "
                                  "supported; index with ints and slices")
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    out, dim = t, 0
    for i in index:
        if i is None:
            out = aten.unsqueeze.default(out, dim)
            dim += 1
        elif i is Ellipsis:
            dim += t.dim() - consumed
        elif isinstance(i, slice):
            out = aten.slice.Tensor(out, dim, i.start, i.stop, 1 if i.step is None else i.step)
            dim += 1
        else:
            out = aten.select.int(out, dim, int(i))
    return out


def _to(t: Tensor, *args, **kwargs) -> Tensor:
    copy = kwargs.pop("copy", False)
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    device = t.device if device is None else device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    dtype = t.dtype if dtype is None else dtype
    if device == t.device and dtype == t.dtype and not copy and memory_format is None:
        return t
    return aten._to_copy.default(t, dtype=dtype, device=device, non_blocking=non_blocking,
                                 **({} if memory_format is None else {"memory_format": memory_format}))


def _fused_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                scale: float | None = None, **_ignored) -> Tensor:
    """The kernel CUDA's SDPA dispatch picks for our calls (no mask): flash for fp16/bf16
    and head_dim <= 256 (multiple of 8), else memory-efficient (fp32, large head dims)."""
    extra = {} if scale is None else {"scale": scale}
    if q.dtype in _HALF and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
        return aten._scaled_dot_product_flash_attention.default(q, k, v, dropout_p, is_causal, False, **extra)[0]
    return aten._scaled_dot_product_efficient_attention.default(q, k, v, attn_mask, False, dropout_p, is_causal,
                                                                **extra)[0]


class _CudaShim(TorchFunctionMode):
    """Routes the Python bindings that need a CUDA device guard (absent from the CPU-only
    wheel) to the aten ops they run, and SDPA on cuda to the fused CUDA kernel."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.__getitem__:
            return _index_view(args[0], args[1])
        if func is Tensor.__setitem__:
            view, value = _index_view(args[0], args[1]), args[2]
            if isinstance(value, Tensor):
                aten.copy_.default(view, value)
            else:
                aten.fill_.Scalar(view, value)
            return None
        if func is Tensor.to:
            return _to(*args, **kwargs)
        if func is Tensor.cuda:
            return _to(args[0], "cuda", non_blocking=kwargs.get("non_blocking", False))
        if func is Tensor.copy_:
            return aten.copy_.default(args[0], args[1], bool(args[2]) if len(args) > 2
                                      else kwargs.get("non_blocking", False))
        if func is Tensor.contiguous:
            fmt = args[1] if len(args) > 1 else kwargs.get("memory_format", torch.contiguous_format)
            t = args[0]
            return t if t.is_contiguous(memory_format=fmt) else aten.clone.default(t, memory_format=fmt)
        if func is F.scaled_dot_product_attention and args[0].device.type == "cuda":
            return _fused_sdpa(*args, **kwargs)
        if getattr(func, "__self__", None) is _DATA and getattr(func, "__name__", "") == "__set__":
            # ``param.data = copy`` (block swap, on_device): a fake tensor keeps its device in a
            # Python attribute that the C++ setter does not update
            func(*args, **kwargs)
            args[0].fake_device = args[1].device
            return None
        if func in (Tensor.record_stream, Tensor.pin_memory):
            return None if func is Tensor.record_stream else args[0]
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- a session


@dataclass
class Stage:
    """One stage's device bytes: live at its start and end, and the most at once during it."""

    name: str
    start: int = 0
    peak: int = 0
    end: int = 0


@dataclass
class FakeGPU:
    """A fake-tensor session with a device-byte tracker; see the module docstring."""

    device_type: str = "cuda"
    stages: dict[str, Stage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.memory = DeviceMemory(self.device_type)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FakeGPU:
        self._stack.enter_context(self.mode)
        self._stack.enter_context(_CudaShim())
        self._stack.enter_context(self.memory)
        self._stack.enter_context(torch.no_grad())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[Stage]:
        """Record the peak device bytes of the code run inside (weights placed inside count)."""
        import gc

        gc.collect()
        s = Stage(name, start=self.memory.current)
        self.memory.reset_peak()
        try:
            yield s
        finally:
            gc.collect()
            s.peak, s.end = self.memory.peak, self.memory.current
            self.stages[name] = s

    @property
    def peaks(self) -> dict[str, int]:
        return {name: s.peak for name, s in self.stages.items()}


# --------------------------------------------------------------------------- fake models


def storage_dtype_rule(storage: str, keep_fp32: Callable[[str], bool] | None,
                       fp8_names: set[str]) -> Callable[[str], tuple[torch.dtype, bool]]:
    """The loaders' storage rule as ``name -> (dtype, has fp8 scale)``: float32-policy
    parameters float32; with fp8 storage, eligible Linear weights fp8 + a float32 scale and
    everything else bf16; otherwise the storage dtype."""
    fp8 = WEIGHT_DTYPES.get(storage)   # fp8.WEIGHT_DTYPES: fp8 names -> dtype ("keep" -> None)
    plain = torch.bfloat16 if fp8 is not None else _DTYPES[storage]

    def rule(name: str) -> tuple[torch.dtype, bool]:
        if keep_fp32 is not None and keep_fp32(name):
            return torch.float32, False
        if fp8 is not None and name in fp8_names:
            return fp8, True
        return plain, False
    return rule


def fake_module(build: Callable[[], nn.Module], storage: str = "bf16",
                keep_fp32: Callable[[str], bool] | None = None, device: str = "cpu") -> nn.Module:
    """``build()`` on the meta device, then every parameter replaced by a fake tensor on
    ``device`` in its storage dtype (:func:`storage_dtype_rule`; scaled fp8 Linear weights
    get their 0-d float32 ``scale_weight``, as the loader registers it). Call inside a
    :class:`FakeGPU`. Nothing is allocated."""
    from .layers import CastLinear

    with torch.device("meta"):
        model = build()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastLinear)}
    rule = storage_dtype_rule(storage, keep_fp32, {n for n in linear if keep_fp32 is None or not keep_fp32(n)})
    for name, p in list(model.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        dtype, scaled = rule(name)
        owner._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
        if scaled:
            owner.register_parameter("scale_weight", nn.Parameter(
                torch.empty((), dtype=torch.float32, device=device), requires_grad=False))
    return model.eval().requires_grad_(False)


def fake_dit(cfg, storage: str = "bf16", attention: str = "sdpa", compute_dtype: torch.dtype | None = torch.bfloat16):
    """A :class:`wan_core.dit.WanDiT` of ``cfg`` with fake weights resting on the (fake) CPU."""
    from .dit import WanDiT, keeps_fp32

    return fake_module(lambda: WanDiT(cfg, compute_dtype=compute_dtype, attention_backend=attention), storage,
                       keeps_fp32)


def fake_vae(cfg=None, storage: str = "fp32"):
    """The Wan VAE (float32 by default, as the loader and the official code run it)."""
    from .configs import VAEConfig
    from .vae import WanVAE

    return fake_module(lambda: WanVAE(cfg or VAEConfig()), storage)


def fake_vae22(cfg=None, storage: str = "fp32"):
    """The Wan 2.2 VAE of TI2V-5B (float32, as the loader runs it)."""
    from .vae22 import VAE22Config, WanVAE22

    return fake_module(lambda: WanVAE22(cfg or VAE22Config()), storage)


def fake_text_encoder(cfg=None, storage: str = "bf16"):
    from .configs import T5Config
    from .text_encoder import UMT5Encoder, keeps_fp32

    return fake_module(lambda: UMT5Encoder(cfg or T5Config()), storage, keeps_fp32)


def fake_clip_vision(cfg=None, storage: str = "fp16"):
    from .clip_vision import CLIPVisionTower, keeps_fp32
    from .configs import CLIPVisionConfig

    return fake_module(lambda: CLIPVisionTower(cfg or CLIPVisionConfig()), storage, keeps_fp32)


# --------------------------------------------------------------------------- attention workspace


def attention_workspace_bytes(backend: str, heads: int, q_len: int, kv_len: int, head_dim: int,
                              batch: int = 1) -> int:
    """Device bytes an attention kernel needs beyond its inputs and output, per call.

    - ``"sdpa"`` on CUDA (flash or memory-efficient, picked by PyTorch): the float32
      log-sum-exp rows ``4 B H Lq`` (flash always writes them; memory-efficient only when
      gradients are needed). The simulation runs these fake kernels, so the rows are already
      in its peak; the figure here is for the planner.
    - ``"flash"`` (flash-attn package): the same log-sum-exp rows ``4 B H Lq``.
    - ``"sage"`` (sageattention): int8 q and k, v in fp8 (or fp16: 2 bytes, the bound taken
      here), the smoothed-k temporary in the compute dtype before it is quantised, and
      per-block float32 scales (< 1 %): ``B H (Lq D + Lk D (1 + 2 + 2)) + 4 B H Lq``.
    - ``"math"``: the full score matrix in the compute dtype plus its float32 softmax,
      ``B H Lq Lk (2 + 4)``.
    """
    rows = 4 * batch * heads * q_len
    if backend in ("sdpa", "auto", "flash"):
        return rows
    if backend == "sage":
        return batch * heads * (q_len * head_dim + kv_len * head_dim * 5) + rows
    if backend == "math":
        return batch * heads * q_len * kv_len * 6
    raise ValueError(f"unknown attention backend {backend!r}")


# --------------------------------------------------------------------------- the stages of a run


@dataclass(frozen=True)
class SimJob:
    """One generation to simulate: the published DiT ``variant`` stored as ``storage``, a
    ``width x height x frames`` video, the text encoder / CLIP storage."""

    variant: str
    storage: str
    width: int = 832
    height: int = 480
    frames: int = 81
    attention: str = "sdpa"
    text_encoder_storage: str = "bf16"
    clip_storage: str = "fp16"
    text_tokens: int = 512       # worst case: prompts of the full umT5 length
    cfg_scale: float = 5.0
    image: bool = False          # Wan 2.2 with a start image (TI2V: per-token timesteps; I2V-A14B: no CLIP)


def sim_latent_shape(out_dim: int, job: SimJob) -> tuple[int, int, int, int]:
    """The latents of ``job`` for a model of ``out_dim`` latent channels: ``(16, T', H/8, W/8)``
    or, 48 channels (Wan 2.2 VAE), ``(48, T', H/16, W/16)``."""
    from .conditioning import latent_shape

    c, t, h, w = latent_shape(job.width, job.height, job.frames)
    return (c, t, h, w) if out_dim != 48 else (48, t, h // 2, w // 2)


def simulate_text_encoder(gpu: FakeGPU, te: nn.Module, on_device: bool, tokens: int = 512) -> Stage:
    """umT5 encode of the positive and negative prompt in one batch (``encode_text``), the
    model moved to the device for the stage (or run where it rests, on the CPU)."""
    from .offload import on_device as placed
    from .text_encoder import encode_text

    class _Tokens:   # the tokenizer's output shape: ids and mask [2, text_len]
        def __call__(self, prompts):
            n = len(prompts)
            return torch.zeros(n, te.config.text_len, dtype=torch.int64), torch.ones(n, te.config.text_len,
                                                                                        dtype=torch.int64)

    device = "cuda" if on_device else "cpu"
    with gpu.stage("text encoder") as s, placed(te, device, empty_cache=False):
        out = [h.float().cpu() for h in encode_text(te, _Tokens(), ["positive", "negative"], device)]
        del out
    return s


def simulate_clip(gpu: FakeGPU, clip: nn.Module, job: SimJob, vae: nn.Module | None = None) -> Stage:
    """CLIP ViT-H/14 encode of the start image (``encode_image``) with CLIP (and the VAE,
    as the run plan's image-encode stage places both) on the device."""
    from .clip_vision import encode_image
    from .run_plan import image_encode_stage

    image = torch.empty(1, 3, job.height, job.width)
    with gpu.stage("CLIP") as s, image_encode_stage([clip, vae], "cuda"):
        feats = encode_image(clip, image).float().cpu()
        del feats
    return s


def simulate_vae_encode(gpu: FakeGPU, vae: nn.Module, clip: nn.Module, job: SimJob, tile: int | None = None) -> Stage:
    """The whole I2V conditioning (``encode_image_conditioning``: CLIP, then the VAE encode
    of the guide video, all ``job.frames`` frames through the causal chunks, untiled or in
    ``tile`` latent-px tiles) with both models on the device; its peak is the encode's."""
    from .conditioning import encode_image_conditioning
    from .run_plan import image_encode_stage

    image = torch.empty(3, job.height, job.width)
    with gpu.stage("VAE encode") as s, image_encode_stage([vae, clip], "cuda"):
        embeds = encode_image_conditioning(vae, clip, image, job.frames, job.width, job.height, vae_tile=tile)
        del embeds
    return s


def simulate_image_encode22(gpu: FakeGPU, vae: nn.Module, job: SimJob, tile: int | None = None) -> Stage:
    """Wan 2.2's image encode with the VAE alone on the device: TI2V-5B's first frame
    (``encode_ti2v_image``, one frame, Wan 2.2 VAE) or I2V-A14B's guide video
    (``encode_image_latents``, all frames, no CLIP)."""
    from .conditioning22 import encode_image_latents
    from .run_plan import image_encode_stage
    from .ti2v import encode_ti2v_image

    image = torch.empty(3, job.height, job.width)
    with gpu.stage("VAE encode") as s, image_encode_stage([vae], "cuda"):
        if vae.config.z_dim == 48:
            out = encode_ti2v_image(vae, image)
        else:
            out = encode_image_latents(vae, image, job.frames, job.width, job.height, vae_tile=tile)
        del out
    return s


def simulate_dit_step(gpu: FakeGPU, dit: nn.Module, job: SimJob, resident_blocks: int,
                      context_cache: bool = False) -> Stage:
    """One denoising step with classifier-free guidance: the conditional and the
    unconditional pass of :func:`wan_core.pipeline.sample`'s model function, the real
    :class:`~wan_core.runner.DiTRunner` over the real :class:`~wan_core.offload.BlockSwap`
    (K resident blocks, the rest streamed one block ahead), inside the real Euler sampler.
    Inputs are placed as ``sample`` places them (latents, text and image conditioning on
    the device); the block swap's weight copies are made inside the stage. ``context_cache``:
    the runner keeps the text K/V of both branches (:class:`~wan_core.runner.ContextKVCache`,
    as the run plan turns it on), dropped at the end of the stage."""
    from .conditioning import make_noise
    from .offload import BlockSwap
    from .runner import DiTRunner
    from .schedulers import flow_schedule, sample_euler
    from .ti2v import FirstFrameRunner

    cfg = dit.cfg
    shape = sim_latent_shape(cfg.out_dim, job)
    with gpu.stage("DiT step") as s:
        swap = BlockSwap(resident_blocks, compute_device="cuda").setup(dit)
        try:
            runner = base = DiTRunner(dit, executor=swap, context_cache=context_cache)
            if cfg.model_type == "ti2v" and job.image:   # first frame pinned: per-token timesteps
                runner = FirstFrameRunner(runner, torch.empty(shape[0], 1, *shape[2:]))
            device = dit.patch_embedding.weight.device
            x = make_noise(0, shape).to(device)[None]
            pos = torch.empty(1, job.text_tokens, cfg.text_dim).to(device)
            neg = torch.empty(1, job.text_tokens, cfg.text_dim).to(device)
            y = clip = None
            if cfg.in_dim != cfg.out_dim:   # mask + image latents (I2V, FLF2V, I2V-A14B)
                y = torch.empty(1, cfg.in_dim - cfg.out_dim, *shape[1:]).to(device)
            if cfg.has_image_input:
                clip = torch.empty(1, 257, cfg.clip_dim).to(device)
            runner.begin_run(1)

            def model_fn(xt: Tensor, t: Tensor) -> Tensor:   # pipeline.sample's, without the NaN checks
                runner.begin_step(0)
                cond = runner(xt, t.to(device), pos, clip, y, branch="cond")
                uncond = runner(xt, t.to(device), neg, clip, y, branch="uncond")
                return uncond + job.cfg_scale * (cond - uncond)

            out = sample_euler(model_fn, x, flow_schedule(1, 5.0, "euler"))[0].float().cpu()
            del out, x, pos, neg, y, clip
            base.context_kv.clear()
        finally:
            swap.release()
    return s


def simulate_vae_decode(gpu: FakeGPU, vae: nn.Module, job: SimJob, tile: int | None) -> Stage:
    """Decode of all latent frames (``decode_tiled`` with the plan's ``tile`` latent px,
    None = untiled; output to the CPU) to frames, as ``generate`` does."""
    from .offload import on_device as placed
    from .pipeline import frames_from_video
    from .vae_tiling import decode_tiled

    latents = torch.empty(sim_latent_shape(vae.config.z_dim, job))
    with gpu.stage("VAE decode") as s, placed(vae, "cuda", empty_cache=False):
        frames = frames_from_video(decode_tiled(vae, latents[None], tile=tile, output_device="cpu"))
        del frames
    return s


def simulate_run(gpu: FakeGPU, job: SimJob, plan, dit: nn.Module, vae: nn.Module, text_encoder: nn.Module | None = None,
                 clip: nn.Module | None = None) -> dict[str, Stage]:
    """Every stage of ``job`` as ``plan`` (a :class:`wan_core.planner.MemoryPlan`) places it:
    text encoder (device or CPU), CLIP and the VAE encode (image models only), one DiT step
    with ``plan.resident_blocks``, the decode with ``plan.vae_tile``. Returns the stages by
    the names of :meth:`wan_core.planner.StagePeaks.items`."""
    out: dict[str, Stage] = {}
    if text_encoder is not None:
        out["text encoder"] = simulate_text_encoder(gpu, text_encoder, not plan.text_encoder_on_cpu, job.text_tokens)
    if dit.cfg.has_image_input and clip is not None:
        out["CLIP"] = simulate_clip(gpu, clip, job, vae)
        out["VAE encode"] = simulate_vae_encode(gpu, vae, clip, job, plan.vae_encode_tile)
    elif job.image and dit.cfg.model_type in ("ti2v", "i2v_noclip"):
        out["VAE encode"] = simulate_image_encode22(gpu, vae, job, plan.vae_encode_tile)
    out["DiT step"] = simulate_dit_step(gpu, dit, job, plan.resident_blocks)
    out["VAE decode"] = simulate_vae_decode(gpu, vae, job, plan.vae_tile)
    return out
