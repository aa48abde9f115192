"""``CompressedLinear``: an ``nn.Linear`` whose weight is held compressed and used without a per-call decode cost.

Three modes:

* ``"lossless"``: the weight as a cupycodec container (ANS float mode on a GPU, byte planes + zstd on a CPU), decoded
  bit-exact into shared scratch when its transformer block starts; the model computes exactly what it did before.
* ``"int8"``: INT8 codes and float32 scales (per output channel, or per group of the input axis) stay resident; a
  fused dequantize-GEMV serves small batches on the GPU, a dequantize-into-scratch plus cuBLAS large ones, torch ops
  on the CPU (:mod:`.ops`).
* ``"int8+entropy"``: the INT8 codes and scales as a container (ANS on a GPU, zstd on a CPU), decoded into scratch
  like the lossless weights, then used like ``"int8"``.

The weights are plain buffers (``packed`` uint8 container bytes, or ``qweight`` int8 and ``scale`` float32), so
``state_dict``, safetensors, ``.to()`` and torch's memory counters see them as they are. The state dict holds no
configuration (no extra state, which safetensors cannot hold): a container describes itself and is checked against
the layer on load, but INT8 codes and scales are checked by their shapes only, so load an ``"int8"`` state dict into
a layer built with the same :meth:`~CompressedLinear.config` (checkpoints record it: ``save_compressed``,
``save_pretrained``). Build one with :meth:`CompressedLinear.from_linear`, or a whole model with
:func:`~cupycodec.integrations.torch.compress_model`.
"""

from __future__ import annotations

import itertools
import math
import weakref
from threading import get_ident

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F

import cupycodec as cc
from cupycodec._config import segment_chunk
from cupycodec._files import release_clean_file_pages
from cupycodec.quant.reference import _is_int

from . import ops, runtime
from .dlpack import current_stream, dtype_name, torch_dtype, usable_device
from .runtime import DecodeGroup, Runtime

__all__ = ["MODES", "CompressedLinear"]

MODES = ("lossless", "int8", "int8+entropy")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MAX_FEATURES = 2**31  # bound on a configuration's sizes (from_config): far above any layer's (~10**6)


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode


def default_codec(mode: str, device: torch.device) -> str:
    """The codec a mode uses when none is named: ANS on a GPU (float mode for lossless weights, byte mode for INT8
    codes), zstd on a CPU (with byte planes for lossless floats: ``auto``)."""
    if device.type == "cuda":
        return "ans"
    return "auto" if mode == "lossless" else "zstd"


# Chunk sizes of ANS payloads compressed on a GPU, for a block whose decode runs beside the previous block's compute
# (benchmarks/trace_graph.py, CUDA-graph decode steps on an H200; benchmarks/RESULTS.md, thirteenth session). nvCOMP
# decodes chunks in parallel, so larger chunks make fewer, longer pieces of work (a block's decode kernel took 58, 85
# and 140 us at 256 KiB, 512 KiB and 1 MiB):
# * INT8 codes in 256 KiB chunks instead of the codec's 128 KiB: steps 4.7 % faster at the TinyLlama-1.1B shape and
#   4.8 % at Llama-2-7B's, and 0.9 % smaller payloads; 512 KiB was slower at both.
# * Lossless weights of at most 24 MiB in 1 MiB chunks (TinyLlama's layers: steps 5.4 % faster than with 256 KiB,
#   whose decodes took more SMs from the compute beside them); larger weights keep the codec's 256 KiB (Llama-2-7B's
#   32-86 MiB layers, whose steps wait for the decode: 1 MiB made them 2.9 % slower).
# Small segments still get at least 16 chunks (cupycodec._config.segment_chunk), as every GPU payload does.
ANS_CODES_CHUNK = 256 * 1024
ANS_SMALL_WEIGHT_CHUNK = 1 << 20
ANS_SMALL_WEIGHT_NBYTES = 24 << 20


def gpu_chunk(mode: str, codec, w: torch.Tensor) -> int | None:
    """The chunk size a weight's payload is compressed in (None: the codec's own default), per the note above."""
    if w.device.type != "cuda" or codec != "ans":
        return None
    if mode == "int8+entropy":
        return segment_chunk(ANS_CODES_CHUNK, w.numel())  # one byte per code
    nbytes = w.numel() * w.element_size()
    if mode == "lossless" and nbytes <= ANS_SMALL_WEIGHT_NBYTES:
        return segment_chunk(ANS_SMALL_WEIGHT_CHUNK, nbytes)
    return None


def _autocast(x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` and ``bias`` in autocast's dtype where autocast is on for ``x``'s device, as autocast runs
    ``F.linear`` (our ops have no autocast rule of their own; float64 is left alone, as autocast leaves it)."""
    if not torch.is_autocast_enabled(x.device.type) or x.dtype == torch.float64:
        return x, bias
    cast = torch.get_autocast_dtype(x.device.type)
    return x.to(cast), (bias.to(cast) if bias is not None else None)


def replaced_why_not(m: torch.nn.Linear) -> str | None:
    """Why a CompressedLinear cannot stand in for ``m`` (None when it computes exactly what ``m`` does): it computes
    ``x @ W.T + b`` and keeps only the weight and the bias, so a subclass's own forward, or another parameter or
    buffer of the layer (spectral_norm's ``weight_orig``, from which its hook makes ``weight`` at every forward),
    would be lost."""
    own = {n for n, _ in m.named_parameters(recurse=False)} | {n for n, _ in m.named_buffers(recurse=False)}
    extra = sorted(own - {"weight", "bias"})
    if type(m) is torch.nn.Linear:
        return f"nn.Linear with tensors of its own ({', '.join(extra)}), which a replacement loses" if extra else None
    if type(m).forward is not torch.nn.Linear.forward or extra or list(m.children()):
        return f"{type(m).__name__} subclasses nn.Linear with its own forward or tensors, which a replacement loses"
    return None


class CompressedLinear(torch.nn.Module):
    """A linear layer ``y = x W^T + b`` whose weight ``W`` is held compressed.

    Parameters
    ----------
    in_features, out_features : int
        As for ``nn.Linear``.
    bias : bool
        Whether the layer has a bias (kept uncompressed, in the weight's dtype).
    mode : {"lossless", "int8", "int8+entropy"}
    granularity : {"channel", "group"}
        INT8 scales: one per output channel, or one per ``group_size`` inputs of each output channel.
    group_size : int
    dtype : torch.dtype
        The weight's dtype (bf16, fp16 or fp32): what lossless decodes to, and the default compute dtype.
    device : torch.device, optional

    The constructor makes an empty layer for ``load_state_dict``; :meth:`from_linear` compresses an existing one.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, mode: str = "int8",
                 granularity: str = "channel", group_size: int = 128, dtype: torch.dtype = torch.bfloat16,
                 device=None):
        super().__init__()
        if device is not None:
            device = usable_device(device)
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not _is_int(v) or v < 0:
                raise TypeError(f"{name} must be an int >= 0 (as for nn.Linear), got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.mode = check_mode(mode)
        if granularity not in ("channel", "group"):
            raise ValueError(f"granularity must be 'channel' or 'group', got {granularity!r}")
        if not _is_int(group_size) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        self.granularity, self.group_size = granularity, int(group_size)
        if dtype not in _FLOATS:
            raise ValueError(f"dtype must be one of {_FLOATS}, got {dtype}")
        self.weight_dtype = dtype
        n, k = self.out_features, self.in_features
        if mode == "int8":
            # NaN scales until a weight is loaded: a forward before load_state_dict (or after one that missed the
            # scales, strict=False) gives NaN, never plausible numbers
            self.register_buffer("qweight", torch.zeros((n, k), dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.full(self._scale_shape(), math.nan, dtype=torch.float32,
                                                     device=device))
        else:
            self.register_buffer("packed", torch.zeros(0, dtype=torch.uint8, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None
        self._template: cc.CompressedArray | None = None  # the container's header over no particular payload
        # (weak reference to the `packed` tensor, its version) that the template describes: a forward that finds
        # another tensor there (torch.func.functional_call, an assignment) or the same one written in place (a tied
        # layer's load_state_dict, copy_) reads the new bytes' header and decodes them, never the old weight
        self._stamp: tuple | None = None
        self._views: dict = {}  # (device, payload address) -> CompressedArray over this module's `packed`
        self._runtime: weakref.ref | None = None  # to the Runtime that decodes this layer (see _attach)
        self._standalone: Runtime | None = None
        self._slot_index = (0, 0)
        # (thread, device, views): the views of the slot this layer's group is active in, handed over by the runtime
        # and taken back when that slot's content changes (Runtime._occupy); a forward uses them without a lookup
        self._hot: tuple | None = None
        # (thread, device, weight): this layer's weight dequantized by its block's start for a large batch, in the
        # runtime's wide buffer; taken back when the next block starts there (Runtime.enter_wide)
        self._wide: tuple | None = None
        self._offloaded = False  # its stored tensors are kept on the host and staged to the GPU per use (.offload)
        self._register()

    # -- construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, mode: str = "int8", *, granularity: str = "channel",
                    group_size: int = 128, codec: str | None = None, device=None) -> CompressedLinear:
        """Compress ``linear.weight`` now; the result is ready to use, on ``linear``'s device (compressed on
        ``device`` when given, e.g. a CPU layer compressed on a GPU)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if (why := replaced_why_not(linear)) is not None:
            raise TypeError(f"{why}: from_linear would compute a different layer")
        w = linear.weight
        if w.dtype not in _FLOATS:
            raise TypeError(f"the weight is {w.dtype}; CompressedLinear compresses float32, float16 or bfloat16")
        if w.is_meta:
            raise ValueError("the weight is on the meta device (a model built empty, e.g. under "
                             "accelerate.init_empty_weights()); load its weights first")
        if device is not None:
            device = usable_device(device)
        if codec not in (None, "auto"):  # every mode: int8 stores no payload, but a name it cannot use is a mistake
            cc.registry.get_codec(codec)  # UnknownCodecError naming the registered codecs
        home = w.device
        work = torch.device(device) if device is not None else home
        # outside inference mode: tensors made inside it could never be saved for backward or loaded into in place
        with torch.inference_mode(False):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, mode=mode,
                        granularity=granularity, group_size=group_size, dtype=w.dtype, device="meta")
            layer._compress(w.detach().to(work), codec or default_codec(mode, work), home)
            if linear.bias is not None:
                layer.bias = torch.nn.Parameter(linear.bias.detach().clone().to(home),
                                                requires_grad=linear.bias.requires_grad)
        return layer.train(linear.training)

    def _compress(self, w: torch.Tensor, codec: str, home: torch.device) -> None:
        stream = current_stream(w.device)
        if self.mode != "lossless":  # room to dequantize this weight at large batch, reserved before any forward
            ops.reserve_scratch(w.numel() * w.element_size())
        if self.mode == "int8":
            c = cc.compress(w, quantize="int8", granularity=self.granularity, group_size=self.group_size,
                            codec="raw", stream=stream)
            q = cc.decompress(c, dequantize=False, stream=stream)
            # copies made by torch: views of CuPy's arrays would keep the codes in CuPy's pool, unseen by torch
            wrap = torch.from_dlpack if c.on_device else torch.from_numpy
            self.qweight, self.scale = wrap(q.codes).to(home, copy=True), wrap(q.scales).to(home, copy=True)
            return
        kw = {"quantize": "int8", "granularity": self.granularity, "group_size": self.group_size} \
            if self.mode == "int8+entropy" else {}
        c = cc.compress(w, codec=codec, chunk_nbytes=gpu_chunk(self.mode, codec, w), stream=stream, **kw)
        self._adopt(c, home)

    def _adopt(self, c: cc.CompressedArray, device: torch.device) -> None:
        """Hold container ``c`` in a uint8 buffer on ``device`` (prelude, header and payload, as ``to_bytes()``)."""
        prefix = c._prefix
        packed = torch.empty(len(prefix) + c._header.payload_nbytes, dtype=torch.uint8, device=device)
        packed[: len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
        if c.on_device:
            packed[len(prefix) :] = torch.from_dlpack(c._payload).to(device)
        else:
            packed[len(prefix) :] = torch.from_numpy(np.frombuffer(c.host_payload(), np.uint8)).to(device)
        self.packed = packed
        self._set_template(c)

    _CONFIG_KEYS = ("mode", "granularity", "group_size", "dtype", "in_features", "out_features", "bias")

    def config(self) -> dict:
        """The layer's configuration (JSON-able): what :meth:`from_config` needs to build it again, empty."""
        return {"mode": self.mode, "granularity": self.granularity, "group_size": self.group_size,
                "dtype": dtype_name(self.weight_dtype), "in_features": self.in_features,
                "out_features": self.out_features, "bias": self.bias is not None}

    @classmethod
    def from_config(cls, config, *, device=None) -> CompressedLinear:
        """An empty layer (for ``load_state_dict``) from :meth:`config`'s dict; ValueError names a bad entry."""
        if not isinstance(config, dict) or sorted(config) != sorted(cls._CONFIG_KEYS):
            raise ValueError(f"a CompressedLinear configuration has the keys {', '.join(cls._CONFIG_KEYS)}, got "
                             f"{config!r}")
        # it comes from a checkpoint's file: sizes are bounded (torch raised an overflow TypeError), and 0 features
        # are taken, as the constructor takes them and compress_model and save_compressed save such a layer
        sizes = [config[k] for k in ("in_features", "out_features")]
        if not all(_is_int(v) and 0 <= v < _MAX_FEATURES for v in sizes) or not isinstance(config["bias"], bool):
            raise ValueError(f"bad CompressedLinear configuration {config!r}: sizes must be integers from 0 to "
                             f"{_MAX_FEATURES - 1}, bias a bool")
        if not (_is_int(config["group_size"]) and 1 <= config["group_size"] < _MAX_FEATURES):
            raise ValueError(f"bad CompressedLinear configuration {config!r}: group_size must be an integer from 1 "
                             f"to {_MAX_FEATURES - 1}")
        if not isinstance(config["dtype"], str):
            raise ValueError(f"bad CompressedLinear configuration {config!r}: dtype must be a name such as "
                             f"{dtype_name(torch.bfloat16)!r}, got {config['dtype']!r}")
        try:
            dtype = torch_dtype(config["dtype"])
        except cc.UnsupportedDtypeError as exc:
            raise ValueError(f"bad CompressedLinear configuration {config!r}: {exc}") from None
        return cls(config["in_features"], config["out_features"], config["bias"], mode=config["mode"],
                   granularity=config["granularity"], group_size=config["group_size"], dtype=dtype, device=device)

    # -- what it holds ----------------------------------------------------------------------------------------
    def _scale_shape(self) -> tuple[int, ...]:
        if self.granularity == "channel":
            return (self.out_features,)
        return (self.out_features, math.ceil(self.in_features / self.group_size))

    @property
    def compressed_nbytes(self) -> int:
        """Bytes the weight occupies (payload, or codes and scales); the bias is not counted."""
        if self.mode == "int8":
            return self.qweight.numel() + self.scale.numel() * 4
        return self.packed.numel()

    def _decoded_nbytes(self) -> list[int]:
        n, k = self.out_features, self.in_features
        if self.mode == "lossless":
            return [n * k * torch.finfo(self.weight_dtype).bits // 8]
        return [n * k, math.prod(self._scale_shape()) * 4]

    def _decoded_layout(self):
        n, k = self.out_features, self.in_features
        if self.mode == "lossless":
            return [self.weight_dtype], [(n, k)]
        return [torch.int8, torch.float32], [(n, k), self._scale_shape()]

    def _payload_ptr(self) -> int:
        return self._buffers["packed"].data_ptr()  # per block start: not through Module.__getattr__

    def _stored(self) -> list[torch.Tensor]:
        """The tensors the weight is stored in: the container bytes, or the INT8 codes and scales."""
        return [self.qweight, self.scale] if self.mode == "int8" else [self.packed]

    def _container_over(self, packed: torch.Tensor) -> cc.CompressedArray:
        """The container over a copy of this module's ``packed`` bytes (a staging buffer's view, for offloading)."""
        if self._template is None:
            self._parse()
        # verified: a copy of this layer's own bytes, checked when they came (load_state_dict, a checkpoint's load)
        return self._template.with_payload(packed[len(self._template._prefix) :], verified=True)

    def _container(self, device: torch.device) -> cc.CompressedArray:
        """The container over this module's ``packed`` bytes where they are now (rebuilt after ``.to()``; its
        header read again if ``packed`` changed since, e.g. back after a ``functional_call`` with other bytes)."""
        if self._template is None:
            self._parse()
        self._packed_changed()
        key = (self.packed.device, self.packed.data_ptr())
        c = self._views.get(key)
        if c is None:
            if self.packed.is_meta:
                raise RuntimeError(
                    "this layer's compressed weight is on the meta device, where it cannot be decoded: the model "
                    "was moved there (.to('meta'); INT8 layers with resident codes infer shapes there, the others "
                    "do not), or accelerate offloaded the model's buffers "
                    "(cpu_offload, disk_offload, dispatch_model with offload_buffers=True) and brings them back "
                    "only around each module's own forward, while a block's layers decode together when it starts; "
                    "offload with cupycodec.integrations.torch.offload_model or its dispatch_model instead")
            prefix = len(self._template._prefix)
            c = self._views[key] = self._template.with_payload(self.packed[prefix:], verified=True)  # as above
            self._views = {key: c}  # one placement at a time
        return c

    def _parse(self) -> None:
        """Read the container from ``packed`` (after load_state_dict): one host copy of the bytes, CRCs checked."""
        if self.packed.numel() == 0:
            raise RuntimeError("this CompressedLinear holds no weight yet: load a state dict or use from_linear()")
        self._set_template(self._check_container(self.packed, trusted=True))

    def _set_template(self, c: cc.CompressedArray) -> None:
        """``c``'s header (and trust) describes this layer's ``packed`` as it is now."""
        self._template = c.without_payload()  # the header alone (and its trust): views over `packed` come from it
        self._views = {}
        self._restamp()

    def _restamp(self) -> None:
        """The template describes ``packed`` as it is now (set after loaders put both in place, and after moves)."""
        p = self._buffers.get("packed")
        self.__dict__["_stamp"] = None if p is None or p.is_meta else (
            weakref.ref(p), None if p.is_inference() else p._version)

    def _packed_changed(self) -> bool:
        """Whether ``packed`` is no longer what the template describes (then read its header again, checking its
        CRCs, with the trust the layer had, and drop everything decoded from the old bytes). ~0.2 us."""
        st = self._stamp
        if st is None:
            return False
        p = self._buffers.get("packed")
        if p is st[0]() and (st[1] is None or p._version == st[1]):
            return False
        if p is None or p.is_meta:  # offloaded to meta by accelerate: _container names that
            return False
        trusted = self._template.trusted if self._template is not None else True
        self._set_template(self._check_container(p, trusted=trusted))
        self._forget_decoded()
        return True

    def _check_container(self, packed: torch.Tensor, *, trusted: bool, key=None) -> cc.CompressedArray:
        """Parse container bytes meant for this layer, check every CRC, and check that they hold this layer's weight
        (shape, dtype, and for int8+entropy the INT8 configuration); raise ValueError naming the difference.

        A state dict is trusted, as anything handed to ``load_state_dict`` is; checkpoints from outside come through
        :func:`~cupycodec.integrations.torch.load_compressed`, which applies the trust rules."""
        if packed.dtype != torch.uint8 or packed.dim() != 1:
            raise ValueError(f"a packed weight is a 1-D uint8 tensor, got {packed.dtype} of shape {list(packed.shape)}")
        host = packed.detach().cpu().numpy()
        return self._expect(cc.CompressedArray.from_bytes(host, trusted=trusted, key=key).verify())

    def _expect(self, c: cc.CompressedArray) -> cc.CompressedArray:
        """``c`` if it holds this layer's weight (shape, dtype, INT8 configuration), else ValueError saying how not."""
        want = (self.out_features, self.in_features)
        got_filters = [f.get_config() for f in c.pipeline if f.get_config()["id"] == "int8"]  # (byte planes: any)
        if self.mode == "lossless":
            expect = []
        else:
            cfg = {"granularity": self.granularity}
            if self.granularity == "group":
                cfg["group_size"] = self.group_size
            else:
                cfg["axis"] = 0
            expect = [cfg]
        got_cfg = [{k: v for k, v in f.items() if k not in ("id", "version")} for f in got_filters]
        if c.shape != want or c.dtype_name != dtype_name(self.weight_dtype) or got_cfg != expect:
            def describe(dt, shape, cfg):
                return f"{dt}{list(shape)} " + (f"int8 {cfg[0]}" if cfg else "lossless")

            raise ValueError(f"the packed weight holds {describe(c.dtype_name, c.shape, got_cfg)}; this layer "
                             f"expects {describe(dtype_name(self.weight_dtype), want, expect)} (mode {self.mode!r}); "
                             "build the layer with the configuration the weight was compressed with")
        return c

    def decompress_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor with the weight (dequantized for the INT8 modes), for inspection; forward never does this."""
        dtype = dtype or self.weight_dtype
        if self.mode == "int8":
            return ops.dequantize(self.qweight, self.scale, self.granularity, self.group_size, dtype)
        c = self._container(self.packed.device)
        # lossless: decoded in its own dtype, then cast if asked; INT8 containers dequantize straight to ``dtype``
        out = torch.empty((self.out_features, self.in_features),
                          dtype=self.weight_dtype if self.mode == "lossless" else dtype, device=self.packed.device)
        stream = current_stream(out.device)
        if c.on_device and c.trusted:
            # a plan of its own, its scratch from torch and gone with it: cc.decompress(c, out=) would keep its plan
            # (and, for int8+entropy, scratch as large as the codes) in CuPy's pool for as long as the layer lives
            plan = cc.decode_plan([c], [out], stream=stream,
                                  alloc=lambda n: torch.empty(n, dtype=torch.uint8, device=out.device))
            plan.run_and_wait(stream)
        else:  # the CPU, or untrusted bytes (decoded by the hardened CPU decoders, then uploaded)
            cc.decompress(c, out=out, stream=stream)
        return out.to(dtype)

    # -- runtime ----------------------------------------------------------------------------------------------
    def __getstate__(self):
        """Without the caches tied to this instance's tensors and runtime (``copy.deepcopy`` and pickling): views
        over ``packed`` where it was, and the runtime, which a copied model's runtime attaches again; a copy gets a
        key of its own for :func:`decoded_linear`."""
        state = self.__dict__.copy()
        state.update(_views={}, _runtime=None, _standalone=None, _hot=None, _wide=None, _stamp=None)
        state.pop("_op_key", None)
        return state

    # A model's runtime is owned by the model and held here weakly: runtime -> groups -> layers -> runtime would be a
    # reference cycle, and `del model` would then free GPU memory only at the next garbage collection. A layer with
    # no runtime (used on its own, or outliving its model) makes one of its own and holds it; that runtime's group
    # holds the layer through a weak proxy, so there is no cycle that way either.
    def _attach(self, runtime: Runtime, group: int, index: int) -> None:
        self._runtime, self._slot_index = weakref.ref(runtime), (group, index)
        self.__dict__["_hot"] = self.__dict__["_wide"] = None

    def _forget_decoded(self) -> None:
        """The stored weight changed: whatever a runtime decoded from the old one is not to be used again."""
        self.__dict__["_hot"] = self.__dict__["_wide"] = None
        rt = self._runtime() if self._runtime is not None else None
        if rt is not None:
            rt.forget(self._slot_index[0])

    def _own_runtime(self) -> Runtime:
        rt = self._runtime() if self._runtime is not None else None
        if rt is not None and (rt is self._standalone or rt.groups[self._slot_index[0]].layers[self._slot_index[1]]
                               is self):
            return rt
        rt = Runtime([DecodeGroup([weakref.proxy(self)], name=f"{type(self).__name__}@{id(self):x}")],
                     prefetch=False)
        self._standalone = rt  # a group of one, in a runtime of its own
        return rt

    def _decoded(self, device: torch.device, enter: bool = False) -> list[torch.Tensor]:
        """This layer's decoded tensors in its runtime's slot (decoding its group first if no slot holds it).
        ``enter``: start the group as its block's hook does (and so prefetch the next block), for forwards that
        run without the hook: traced ones (the hook is a no-op there) and the backward pass."""
        if self._stamp is not None:
            self._packed_changed()
        hot = self._hot
        if hot is not None and hot[0] == get_ident() and hot[1] == device:
            return hot[2]  # the group is active in this thread's slot on this device (Runtime._activate)
        rt = self._own_runtime()
        if enter:
            rt.enter(self._slot_index[0], device)
        return rt.views(*self._slot_index, device)

    def _register(self) -> None:
        """Give this layer its key in :data:`_LAYERS`, for the :func:`decoded_linear` op: when it is made or
        copied, not when a forward needs it (Dynamo traces the forward, and cannot trace a registration)."""
        self._op_key = next(_KEYS)
        _LAYERS[self._op_key] = self

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register()
        self._restamp()

    def _decoded_linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._linear(x, self._decoded(x.device, enter=True), bias)

    def _linear(self, x: torch.Tensor, views: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "lossless":
            w = views[0]
            if w.dtype != x.dtype:  # the module was cast (.half(), .float()): the decoded weight follows, per call
                w = w.to(x.dtype)
            return F.linear(x, w, ops._bias(bias, x))
        codes, scales = views  # int8+entropy, or offloaded int8: where the block's staging put them
        return ops.linear(x, codes, scales, bias, self.granularity, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        resident = self.mode == "int8" and not self._offloaded
        if type(x) is torch.Tensor and not x.is_floating_point():  # nn.Linear refuses these; the weight was cast
            raise TypeError(f"a CompressedLinear takes floating-point input, got {x.dtype}; cast the input (for "
                            f"example x.to({self.weight_dtype}))")
        if (type(x) is not torch.Tensor or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
                or torch._C._is_tracing()  # torch.jit.trace: ~0.05 us, where is_tracing() costs 0.2
                or torch._C._are_functorch_transforms_active()  # vmap's batched tensors have no data pointer
                or _forward_ad._current_level >= 0):  # dual tensors (forward-mode AD)
            # traced (one opaque op: no graph break, so CUDA graphs of inductor's take whole forwards), or recorded
            # for autograd (whose backward decodes the weight again: the slot will hold other blocks by then)
            # torch.fx.symbolic_trace passes Proxies (no device, no dtype to ask about); torch.export (non-strict)
            # sets is_exporting(). Not asked while Dynamo traces: on torch 2.11 one of them read True under a plain
            # torch.compile (seven compile tests failed on the H200), so a strict export is not refused here (its
            # program holds the container bytes: decoded_linear takes them)
            dynamo = torch.compiler.is_dynamo_compiling()
            proxy = not dynamo and isinstance(x, torch.fx.Proxy)
            if not resident and not dynamo and (proxy or torch.compiler.is_exporting()):
                raise self._not_portable("torch.export and torch.fx")
            if not dynamo and not proxy:
                if torch._C._is_tracing():  # INT8: the op, with autograd on or off (one graph for jit's check)
                    if not resident:
                        raise self._not_portable("torch.jit.trace")
                elif torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
                    return self._differentiable(x, bias)
            if not proxy and torch._C._is_any_autocast_enabled():
                x, bias = _autocast(x, bias)
            if resident:
                return ops.int8_linear(x, self.qweight, self.scale, bias, self.granularity, self.group_size)
            return decoded_linear(x, self._buffers.get("packed"), bias, self._op_key, self.out_features)
        if torch._C._is_any_autocast_enabled():  # ~0.05-0.2 us: the CUDA GEMV would run in x's dtype
            x, bias = _autocast(x, bias)
        if x.numel() > ops.GEMV_MAX_M * self.in_features and self.mode != "lossless":
            w = self._wide_weight(x)
            if w is not None:  # a large batch: this layer's weight, dequantized with its block's
                return F.linear(x, w, ops._bias(bias, x))
        if resident:
            q = self.qweight
            if q.is_cpu and q.data_ptr() % 64:  # is_cpu: ~0.05 us on a GPU forward, .device.type ~0.5
                q = self._aligned_codes()
            return ops._int8_linear(x, q, self.scale, bias, self.granularity, self.group_size)
        return self._linear(x, self._decoded(x.device), bias)

    def _differentiable(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Under torch.func's transforms (grad, jvp, vmap, their compositions) or forward-mode AD: ``F.linear`` over
        the weight as a tensor of its own, which they differentiate and batch as any F.linear's. The ops' formulas
        are backward-only (a jvp through them came out zero, and grad raised torch's setup_context error), and a
        runtime's slots made inside a transform would hold tensors without storage for good, so a decoded weight is
        decoded with the transforms off and copied out of its slot."""
        if self.mode == "int8" and not self._offloaded:
            w = ops.dequantize(self.qweight, self.scale, self.granularity, self.group_size, x.dtype)
            return F.linear(x, w, ops._bias(bias, x))
        packed = self._buffers.get("packed")
        if packed is not None and torch._C._functorch.is_functorch_wrapped_tensor(packed):
            raise RuntimeError(f"torch.func cannot transform a {self.mode!r} CompressedLinear's own buffers "
                               "(torch.func.stack_module_state, or 'packed' among the arguments a transform batches "
                               "or differentiates): its container bytes decode as a whole. Transform the inputs and "
                               "the bias, or use mode='int8', whose codes and scales are ordinary tensors")
        with torch._C._DisableFuncTorch():
            views = self._decoded(x.device, enter=True)
            if self.mode == "lossless":
                w = views[0].to(x.dtype, copy=True)
            else:
                w = ops.dequantize(views[0], views[1], self.granularity, self.group_size, x.dtype)
        return F.linear(x, w, ops._bias(bias, x))

    def _not_portable(self, what: str) -> RuntimeError:
        """The error for a program that would outlive this process's runtime: a lossless or int8+entropy layer's
        weight is decoded by the runtime into a slot shared by its block (a traced graph would hold the slot, or a
        key into this process's layers, not the weight)."""
        return RuntimeError(f"{what} cannot capture a {self.mode!r} CompressedLinear: its weight is decoded by "
                            "cupycodec's runtime into memory its block shares, which a traced program would keep "
                            "instead of the weight. Trace or export the uncompressed model, or one compressed with "
                            "mode='int8' (its codes and scales are ordinary tensors of the program); torch.compile "
                            "works in every mode")

    def __prepare_scriptable__(self):
        raise RuntimeError("torch.jit.script cannot compile a CompressedLinear (its forward calls cupycodec's "
                           "runtime); use torch.compile, or torch.export / torch.jit.trace with mode='int8'")

    def _aligned_codes(self) -> torch.Tensor:
        """The codes moved once into 64-byte aligned storage, at a first eager CPU forward. A model loaded by
        ``from_pretrained`` holds them at the file's offsets, which torch's CPU INT8 GEMV cannot read (ops stages
        them into scratch instead, a copy per call: 2-3x the GEMV's time on a large layer); same values, so the
        state dict and the outputs do not change. Made outside inference mode, so later in-place loads still work.
        The file's pages the codes were read from then leave the resident set where nothing wrote them (they stay
        in the page cache): without that, a reloaded INT8 model's first forward held its codes twice (SmolLM2 on
        the CPU: peak RSS 367 MiB against a 138 MiB checkpoint, 2026-12-03)."""
        old = self.qweight
        with torch.inference_mode(False):
            q = old.clone(memory_format=torch.contiguous_format)
        self._buffers["qweight"] = q
        if old.is_contiguous():
            release_clean_file_pages(old.data_ptr(), old.numel())
        return q

    def _wide_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a large batch on a GPU: this layer's weight in its slot's wide buffer (``Runtime.enter(...,
        wide=True)``), starting its block that way if no hook did (blocks of resident INT8 codes have no hook: their
        one-token steps have nothing to decode); None where the runtime has none for ``x``."""
        wide = self._wide
        if wide is None or wide[0] != get_ident() or wide[1] != x.device:
            rt = self._runtime() if self._runtime is not None else None
            gi = self._slot_index[0]
            if rt is None or not runtime.WIDE or not x.is_cuda or rt.groups[gi].wide_dtype != x.dtype:
                return None
            rt.enter(gi, x.device, wide=True)
            wide = self._wide
        return wide[2] if wide is not None and wide[2].dtype == x.dtype else None

    # -- state dict ---------------------------------------------------------------------------------------------
    # The state dict holds plain tensors only (``packed``, or ``qweight`` and ``scale``, and ``bias``), so it saves
    # with safetensors as it is; a packed container describes itself, and is checked against the layer on load.
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "packed"
        parsed = None
        if self.mode != "int8" and key in state_dict:
            try:  # before anything changes: a wrong or corrupt weight leaves the layer as it was
                parsed = self._check_container(state_dict[key], trusted=True)
            except (ValueError, cc.CupycodecError) as exc:
                error_msgs.append(f"{key}: {exc}")
                return
            if state_dict[key].shape != self.packed.shape:  # a container has its size
                room = torch.empty_like(state_dict[key], device=self.packed.device)
                try:  # the same tensor on new storage: a layer tied to this one (sharing it) sees the new bytes too
                    with torch.no_grad():
                        self.packed.set_(room)
                except RuntimeError:  # an inference tensor outside inference mode
                    self.packed = room
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if parsed is not None:
            self._set_template(parsed)
        # decoded per use (slots and plans hold the old weight), or dequantized for a large batch (the wide buffer)
        self._forget_decoded()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers.get(name) for name in ("scale", "qweight", "packed")}
        before = {t.device for t in self._stored()}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            moved = self._buffers.get(name)
            if old is not None and moved is not None and moved.dtype != old.dtype:
                # a dtype cast (.half(), .to(dtype), Module.type()): INT8 scales stay float32 and exact, and
                # container bytes and codes are not numbers to cast; only their device follows
                self._buffers[name] = old.to(moved.device)
        for device in before - {t.device for t in self._stored()}:
            # moved off a device (.cpu(), .to()): the runtime gives back its slots, plans and views there (the first
            # layer to move releases them; a forward on that device later makes them again)
            for rt in {id(r): r for r in (self._runtime() if self._runtime is not None else None, self._standalone)
                       if r is not None}.values():
                rt.release(device)
        self._views = {}  # buffers may have moved; the template keeps the header
        if self._template is not None:
            self._restamp()  # the same bytes, wherever they went
        self.__dict__["_hot"] = self.__dict__["_wide"] = None  # views on the old device
        rt = self._runtime() if self._runtime is not None else None
        if rt is not None:
            rt.groups[self._slot_index[0]].drop_wide()  # its launch reads the codes where they were
        return out

    def extra_repr(self) -> str:
        extra = f", granularity={self.granularity!r}" if self.mode != "lossless" else ""
        if self.mode != "lossless" and self.granularity == "group":
            extra += f", group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mode={self.mode!r}{extra}, dtype={self.weight_dtype}")


# -- the decoded layers as one torch op ---------------------------------------------------------------------------
# Layers whose weight decodes into a runtime slot (lossless, int8+entropy, offloaded int8) reach the op through a
# key: an op takes tensors and numbers, not modules. Keys are never reused; an entry goes with its layer.
_KEYS = itertools.count(1)
_LAYERS: weakref.WeakValueDictionary[int, CompressedLinear] = weakref.WeakValueDictionary()


def _layer(key: int) -> CompressedLinear:
    layer = _LAYERS.get(key)
    if layer is None:
        raise RuntimeError(f"cupycodec::decoded_linear: compressed layer {key} no longer exists (a compiled graph "
                           "or a saved backward outlived its model)")
    return layer


def _with_packed(layer: CompressedLinear, packed: torch.Tensor | None, fn):
    """``fn(layer)`` with ``packed`` as the layer's container bytes. Mostly its own; a traced program may be given
    others (``torch.func.functional_call`` under ``torch.compile``, whose swap happened at trace time only; an
    exported program run beside other models, whose keys may name another layer): they are swapped in for the call
    as ``functional_call`` swaps them in eager forwards, so the header is read again from them (and checked against
    the layer: another shape or configuration raises) and the weight decoded from them, never the layer's own."""
    own = layer._buffers.get("packed")
    if packed is None or own is None or (packed.data_ptr() == own.data_ptr() and packed.shape == own.shape
                                         and packed.device == own.device):
        return fn(layer)
    layer._buffers["packed"] = packed
    try:
        return fn(layer)
    finally:
        layer._buffers["packed"] = own


@torch.library.custom_op("cupycodec::decoded_linear", mutates_args=())
def decoded_linear(x: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None, layer: int,
                   out_features: int) -> torch.Tensor:
    """``x W^T + bias`` for compressed layer ``layer`` (its ``_op_key``), ``W`` decoded from ``packed`` (the
    layer's container bytes; None for offloaded INT8 codes) into its runtime's slot when not resident there: what a
    traced or autograd-recorded forward runs. ``packed`` is an input so that a graph reads the bytes it was given
    (:func:`_with_packed`). The block's decode and the next block's prefetch happen inside the op, on torch's
    current stream, as the block hook does in eager forwards; the op reads the slot and writes only its fresh
    output."""
    return _with_packed(_layer(layer), packed, lambda lyr: lyr._decoded_linear(x, bias))


@decoded_linear.register_fake
def _(x, packed, bias, layer, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


def _setup_context(ctx, inputs, output):
    x, packed, bias, ctx.layer, _ = inputs
    ctx.has_bias, ctx.in_features = bias is not None, x.shape[-1]
    ctx.save_for_backward(packed)


@torch.library.custom_op("cupycodec::decoded_linear_grad", mutates_args=())
def decoded_linear_grad(grad: torch.Tensor, packed: torch.Tensor | None, layer: int, in_features: int) -> torch.Tensor:
    """``grad @ W`` for compressed layer ``layer``, the weight decoded again from ``packed`` (the slot that held it
    in the forward holds another block's by now): :func:`decoded_linear`'s backward, an op of its own so that AOT
    autograd traces the backward without reading the runtime's tensors."""
    return _with_packed(_layer(layer), packed, lambda lyr: _grad_input(lyr, grad))


def _grad_input(layer: CompressedLinear, grad: torch.Tensor) -> torch.Tensor:
    views = layer._decoded(grad.device, enter=True)
    if layer.mode == "lossless":
        return grad @ views[0].to(grad.dtype)
    return ops.grad_input(grad, views[0], views[1], layer.granularity, layer.group_size)


@decoded_linear_grad.register_fake
def _(grad, packed, layer, in_features):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _backward(ctx, grad):
    """Gradients for the activations and the bias (adapters trained over frozen compressed weights)."""
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    (packed,) = ctx.saved_tensors
    return decoded_linear_grad(grad, packed, ctx.layer, ctx.in_features), None, grad_bias, None, None


decoded_linear.register_autograd(_backward, setup_context=_setup_context)


def _grad_setup_context(ctx, inputs, output):
    _, packed, ctx.layer, _ = inputs
    ctx.out_features = _layer(ctx.layer).out_features
    ctx.save_for_backward(packed)


def _grad_backward(ctx, grad):
    """``grad @ W`` is linear in ``grad``: its own gradient is ``grad @ W^T`` (double backward: gradient penalties)."""
    (packed,) = ctx.saved_tensors
    return decoded_linear(grad, packed, None, ctx.layer, ctx.out_features), None, None, None


decoded_linear_grad.register_autograd(_grad_backward, setup_context=_grad_setup_context)
