"""Hugging Face transformers: ``CupycodecConfig`` and its quantizer, through transformers' quantizer plugin API.

* ``from_pretrained(bf16_dir, quantization_config=CupycodecConfig(mode="int8"))`` compresses while loading: the
  chosen Linear layers become :class:`CompressedLinear` on the meta device before any weight is read, and each
  weight is compressed as it arrives (per-tensor conversion), so the model never holds its uncompressed weights.
* ``model.save_pretrained(out)`` writes the compressed checkpoint of :mod:`.checkpoint`, with ``quantization_config``
  (``quant_method: "cupycodec"``) in ``config.json``.
* ``from_pretrained(out)`` reads it back: the layers are built from the checkpoint's metadata, and every tensor goes
  through a conversion that checks its CRCs (and MACs) on the host before it reaches the device.

Registered with transformers when :mod:`cupycodec.integrations.torch` is imported (``import cupycodec.integrations``
arranges that too). A checkpoint that is not signed with this user's key loads only through hardened decoders
unless ``CupycodecConfig(trusted=True)`` (or ``key=``) is passed to ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys
import time
import warnings

import torch

import cupycodec as cc
from cupycodec._files import trim_heap
from cupycodec.errors import AuthenticationError, FormatError, UnsupportedVersionError, prefix_message

from . import _signing
from ._shards import INDEX, WEIGHTS
from .checkpoint import (
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    SENTINEL,
    Checkpoint,
    Checks,
    PlacedChecks,
    _materialize_host,
    _plan,
    _trust,
    checkpoint_state,
    tie_aliases,
)
from .dlpack import usable_device
from .linear import CompressedLinear, check_mode, default_codec, replaced_why_not
from .model import (
    CompressionReport,
    LayerReport,
    _is_linear,
    _left_alone_by_default,
    _read_by_code,
    _read_by_torch,
    _sqnr,
    conv1d_note,
    fused_weights,
    install,
    set_module,
)

from transformers.quantizers import HfQuantizer  # isort: skip
from transformers.quantizers.auto import (  # isort: skip
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.quantizers_utils import should_convert_module  # isort: skip
from transformers.utils.quantization_config import QuantizationConfigMixin  # isort: skip

try:  # transformers >= 5: per-tensor conversions
    from transformers.core_model_loading import ConversionOps, WeightConverter
except ImportError as exc:  # pragma: no cover - transformers 4.x
    raise ImportError("cupycodec's transformers integration needs transformers >= 5 (per-tensor weight "
                      "conversions): pip install -U transformers") from exc

__all__ = ["QUANT_METHOD", "CupycodecConfig", "CupycodecHfQuantizer", "compress_checkpoint", "from_pretrained",
           "register"]

QUANT_METHOD = "cupycodec"


class CupycodecConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of cupycodec models.

    Parameters
    ----------
    mode : {"lossless", "int8", "int8+entropy"}
        How Linear weights are held (see :class:`CompressedLinear`).
    granularity, group_size
        INT8 scales: per output channel, or per ``group_size`` inputs.
    codec : str, optional
        Codec of the lossless and int8+entropy payloads (default: ANS on a GPU, zstd-based on a CPU).
    modules_to_convert : list of str, optional
        Regular expressions: compress only the Linear layers whose name one of them matches (``re.search``).
    modules_to_not_convert : list of str, optional
        Linear layers to leave alone (names, prefixes or patterns, as transformers' other quantizers take them), in
        addition to the output head and weights tied to embeddings.
    trusted, key
        Loading only, never saved: vouch for a checkpoint, or give the key it was signed with (see
        :func:`~cupycodec.integrations.torch.load_compressed`).
    strict : bool
        Loading only, never saved: refuse a checkpoint that lacks tensors of the model ``config.json`` describes,
        before reading any (transformers' default, kept here, loads it and initializes the missing ones at random).
    checkpoint : str, optional
        Written by :func:`~cupycodec.integrations.torch.save_compressed`: the id of the save whose weights this
        ``config.json`` was written with. Loading compares it with the weights' own: a directory read while another
        save replaced its files (or holding files of two saves) is refused, where it loaded one save's config with
        the other's weights.
    offload, max_gpu_memory, offload_device
        Loading only, never saved: once loaded (load onto the host: no ``device_map``, or ``device_map="cpu"``),
        place the model on ``offload_device`` (default: the current CUDA device) with its blocks' compressed
        weights in pinned host memory, under an optional budget (see
        :func:`~cupycodec.integrations.torch.offload_model`; its report is ``model.cupycodec_offload``).
    """

    # What config.json holds (to_dict); from_dict takes nothing else from a file
    _SAVED = ("quant_method", "mode", "granularity", "group_size", "codec", "modules_to_convert",
              "modules_to_not_convert", "format_version", "checkpoint")
    _LOADING = ("trusted", "key", "offload", "max_gpu_memory", "offload_device", "strict")  # never from a dict

    def __init__(self, mode: str = "int8", granularity: str = "channel", group_size: int = 128,
                 codec: str | None = None, modules_to_convert: list[str] | None = None,
                 modules_to_not_convert: list[str] | None = None,
                 format_version: int = FORMAT_VERSION, trusted: bool = False, key=None, offload: str | None = None,
                 max_gpu_memory=None, offload_device=None, strict: bool = False, checkpoint: str | None = None,
                 **kwargs):
        if kwargs.pop("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"CupycodecConfig is quant_method {QUANT_METHOD!r}")
        if kwargs:  # a typo would otherwise be ignored (config.json's keys of newer writers go through from_dict)
            import inspect

            takes = [p for p in inspect.signature(CupycodecConfig.__init__).parameters if p not in ("self", "kwargs")]
            raise TypeError(f"CupycodecConfig got unexpected arguments {sorted(kwargs)}; it takes {', '.join(takes)}")
        self.quant_method = QUANT_METHOD
        if type(format_version) is not int or format_version < 1:  # "1", 1.0, None, True, 0: not a version
            raise ValueError(f"quantization_config: format_version must be an int of at least 1, got "
                             f"{format_version!r} (config.json edited by hand?)")
        if format_version > FORMAT_VERSION:
            raise UnsupportedVersionError("cupycodec checkpoint format (quantization_config)", format_version,
                                          FORMAT_VERSION)
        try:
            self.mode = check_mode(mode)
        except ValueError as exc:
            raise ValueError(f"quantization_config: {exc} (a checkpoint from a newer cupycodec? upgrade it)") \
                from None
        if granularity not in ("channel", "group"):
            raise ValueError(f"quantization_config: granularity must be 'channel' or 'group', got {granularity!r}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"quantization_config: group_size must be a positive int, got {group_size!r}")
        for name, value in (("modules_to_convert", modules_to_convert),
                            ("modules_to_not_convert", modules_to_not_convert)):
            if value is not None and not (isinstance(value, list) and all(isinstance(m, str) for m in value)):
                raise ValueError(f"quantization_config: {name} must be a list of module names or patterns")
        for name, patterns in (("modules_to_convert", modules_to_convert),
                               ("modules_to_not_convert", modules_to_not_convert)):
            for pattern in patterns or ():  # an invalid one raised re.error in the middle of a load
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"quantization_config: {name} pattern {pattern!r}: {exc}") from None
        _check_codec(codec)
        for name, flag in (("trusted", trusted), ("strict", strict)):
            if not isinstance(flag, bool):  # "yes", 0, None: a trust decision is never guessed from a truthy value
                raise TypeError(f"quantization_config: {name} must be True or False, got {flag!r}")
        self.granularity, self.group_size, self.codec = granularity, group_size, codec
        self.modules_to_convert, self.modules_to_not_convert = modules_to_convert, modules_to_not_convert
        self.format_version = FORMAT_VERSION
        if key is not None:  # named now, as every other field is, not inside from_pretrained's load
            from cupycodec.container import _check_key

            try:
                key = _check_key(key)
            except (TypeError, ValueError) as exc:
                prefix_message(exc, "quantization_config")
                raise
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise ValueError(f"quantization_config: checkpoint must be a save's id (a str), got {checkpoint!r} "
                             "(config.json edited by hand?)")
        self.trusted, self.key, self.strict, self.checkpoint = trusted, key, strict, checkpoint
        from .offload import check_options

        try:
            offload = check_options(offload, max_gpu_memory)
        except ValueError as exc:
            raise ValueError(f"quantization_config: {exc}") from None
        self.offload, self.max_gpu_memory, self.offload_device = offload, max_gpu_memory, offload_device

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        """The configuration ``config.json`` holds (transformers builds it with this). Only the keys :meth:`to_dict`
        writes are taken: others are a newer writer's, ignored as the format's unknown keys are, and loading
        attributes (``trusted``, ``key``, ``offload``, ...) never come from a checkpoint's own files: a checkpoint
        that says ``"trusted": true`` must not vouch for itself."""
        dropped = sorted(k for k in config_dict if k not in cls._SAVED)
        if dropped:  # a user's dict takes this path too: a typo ("mdoe") would silently give the default mode
            loading = [k for k in dropped if k in cls._LOADING]
            warnings.warn(f"quantization_config: {', '.join(map(repr, dropped))} ignored"
                          + (f" ({', '.join(loading)}: pass CupycodecConfig(...) for these; a dict, like a "
                             "checkpoint's config.json, cannot set them)" if loading else
                             " (not a key of this cupycodec's configuration: a typo, or a newer writer's)"),
                          stacklevel=2)
        config_dict = {k: v for k, v in config_dict.items() if k in cls._SAVED}
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD, "mode": self.mode, "granularity": self.granularity,
                "group_size": self.group_size, "codec": self.codec, "modules_to_convert": self.modules_to_convert,
                "modules_to_not_convert": self.modules_to_not_convert, "format_version": self.format_version,
                **({"checkpoint": self.checkpoint} if self.checkpoint is not None else {})}

    def to_diff_dict(self) -> dict:
        return self.to_dict()

    def get_loading_attributes(self) -> dict:
        return {"trusted": self.trusted, "key": self.key, "offload": self.offload,
                "max_gpu_memory": self.max_gpu_memory, "offload_device": self.offload_device, "strict": self.strict}

    def __repr__(self):
        return f"CupycodecConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items() if k != 'quant_method')})"


def _check_codec(codec) -> None:
    """Refuse a codec no registered class implements, when the config is made: later, it fails inside
    transformers' per-tensor conversions (or, in int8 mode, which stores no payload, is never looked at)."""
    if codec is None or codec == "auto":
        return
    if not isinstance(codec, str):
        raise TypeError(f"quantization_config: codec must be a codec id (str) or None, got {codec!r}")
    from cupycodec import registry

    known = registry.registered_codecs()
    if codec not in known:
        exc = cc.UnknownCodecError(codec, [*known, "auto"])
        prefix_message(exc, "quantization_config")
        raise exc


class _Same(ConversionOps):
    """The reverse of a loading conversion: nothing (a checkpoint is saved from the model's own tensors)."""

    def convert(self, input_dict, **kwargs):
        return input_dict


class _Op(ConversionOps):
    """A conversion that holds the quantizer; deep copies (one per tensor, by transformers) share it."""

    def __init__(self, quantizer: CupycodecHfQuantizer):
        self.hf_quantizer = quantizer  # the name transformers looks for: tensors bound for it are never cast

    def __deepcopy__(self, memo):
        return self

    @property
    def reverse_op(self) -> ConversionOps:
        return _Same()

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        """``_convert``, its first error kept on the quantizer and raised by it once transformers has loaded.
        transformers catches every error of a conversion, keeps its text for a report that an application may
        silence, and raises a RuntimeError of its own that names nothing; a tensor skipped here reads as missing
        instead, and the quantizer's last hook raises the error itself, type and message as they were. Once a
        conversion has failed the others are not done: the load is lost, and their tensors would only be read."""
        q = self.hf_quantizer
        if q._error is None:
            try:
                return self._convert(input_dict, full_layer_name, model)
            except Exception as exc:
                q._fail(exc)
                # transformers' report would list the skipped tensors as missing, "newly initialized": the load
                # fails instead, with this error
                model._keys_to_ignore_on_load_missing = {*(model._keys_to_ignore_on_load_missing or ()), ".*"}
        return self._skip(input_dict, full_layer_name, model)

    def _skip(self, input_dict, full_layer_name, model) -> dict:
        return {}


class _Compress(_Op):
    """bf16 weight in, compressed layer buffers out (compress-while-loading)."""

    def _skip(self, input_dict, full_layer_name, model) -> dict:
        # the placeholder still gets an empty tensor: one that transformers counted missing would be allocated whole
        try:
            placeholder = model.get_submodule(full_layer_name.rpartition(".")[0])._parameters["weight"]
            (value,) = (v[0] if isinstance(v, list) else v for v in input_dict.values())
            return {full_layer_name: _placeholder(placeholder, value.device)}
        except Exception:  # the error that stopped the load is raised later; this is only a placeholder
            return {}

    def _convert(self, input_dict, full_layer_name, model):
        (value,) = (v[0] if isinstance(v, list) else v for v in input_dict.values())
        fqn = full_layer_name.rpartition(".")[0]
        layer = model.get_submodule(fqn)
        cfg = self.hf_quantizer.quantization_config
        placeholder = layer._parameters["weight"]
        if tuple(value.shape) != (layer.out_features, layer.in_features):  # transformers checks none it hands over
            raise ValueError(f"layer {fqn!r}: the checkpoint's weight has shape {list(value.shape)}; the model (its "
                             f"config.json) expects [{layer.out_features}, {layer.in_features}]: the checkpoint and "
                             "its config disagree")
        if value.dtype != layer.weight_dtype:
            value = value.to(layer.weight_dtype)
        work = value.device
        gpu = getattr(self.hf_quantizer, "_map_gpu", None)
        if work.type == "cpu" and gpu is not None:  # a block mapped to the host, to be streamed to this GPU
            work = gpu
        try:
            layer._compress(value.to(work), cfg.codec or default_codec(layer.mode, work), value.device)
        except (ValueError, TypeError, RuntimeError) as exc:
            prefix_message(exc, f"layer {fqn!r}")
            raise
        rep = LayerReport(fqn, (layer.out_features, layer.in_features), value.numel() * value.element_size(),
                          layer.compressed_nbytes)
        if layer.mode != "lossless":
            rep.sqnr_db = _sqnr(value, layer)
        self.hf_quantizer._reports.append(rep)
        self.hf_quantizer._converted.add(fqn)
        # the layer's buffers, so that transformers counts them loaded, and for the placeholder an empty tensor on
        # the layer's device (dropped after loading): a meta one would reach accelerate's dispatch of a device map
        # that spans devices, which runs before the quantizer's last hook and cannot place a meta tensor
        out = {f"{fqn}.{k}": b for k, b in layer._buffers.items()}
        out[full_layer_name] = _placeholder(placeholder, value.device)
        return out


def _placeholder(weight: torch.Tensor, device) -> torch.Tensor:
    """The empty stand-in a compressed layer's weight gets while loading (dropped after): no element, but two
    dimensions, as some models' ``_init_weights`` read ``fan_out, fan_in = module.weight.shape`` of every module
    whose class name holds "Linear" (Funnel's: a 1-D stand-in failed the load with "not enough values to unpack")."""
    return torch.empty((0, weight.shape[-1] if weight.dim() == 2 else 0), dtype=weight.dtype, device=device)


class _Load(_Op):
    """A checkpoint tensor in (on the host), checked (CRCs, MACs) and made ready for the model, out."""

    def _convert(self, input_dict, full_layer_name, model):
        (value,) = (v[0] if isinstance(v, list) else v for v in input_dict.values())
        q = self.hf_quantizer
        ckpt = q._ckpt
        where = f"{os.path.join(ckpt.directory, ckpt.where.get(full_layer_name, '?'))}: tensor {full_layer_name!r}"
        out = _materialize_host(full_layer_name, ckpt.table.tensors[full_layer_name], value, q._trusted, q._mac_key,
                                q._plan, where, defer=lambda fn: q._checks.submit(where, fn), placed=q._placed)
        template = next((v for k, v in out.items() if isinstance(k, tuple)), None)
        if template is not None:
            model.get_submodule(full_layer_name.rpartition(".")[0])._set_template(template)
        return {k: v for k, v in out.items() if isinstance(k, str)}


class CupycodecHfQuantizer(HfQuantizer):
    """transformers' side of cupycodec: module swaps before loading, per-tensor conversions, serialization."""

    requires_calibration = False

    def __init__(self, quantization_config: CupycodecConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized and getattr(quantization_config, "checkpoint", None) is not None:
            quantization_config.checkpoint = None  # compressing while loading: no save's id (one read from a dict)
        self._ckpt = None
        self._plan = None
        self._trusted = False
        self._mac_key = None
        self._checks: Checks | None = None
        self._placed: PlacedChecks | None = None
        self._reports: list[LayerReport] = []
        self.offloaded = False  # some of the model's blocks live in host memory (set by .offload)
        self._skipped: dict[str, str] = {}
        self._error: BaseException | None = None  # the first error of a conversion, raised once transformers is done
        self._t0 = time.perf_counter()

    def _fail(self, exc: BaseException) -> None:
        """Keep the first error of a conversion (see ``_Op.convert``) and stop the checks: the load is lost."""
        if self._error is None:
            self._error = exc
        self._abandon()

    def _abandon(self) -> None:
        """Stop and drop the pending CRC and MAC checks (their threads too) and what the load held."""
        checks, self._checks, self._placed = self._checks, None, None
        if checks is not None:
            checks.abandon()
        self._ckpt = self._plan = None

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("cupycodec models cannot be offloaded to disk; use a device_map of GPUs and 'cpu' "
                             "(compressed blocks mapped to 'cpu' are streamed to the GPU as they run)")
        self._device_map = device_map if isinstance(device_map, dict) else None
        self._map_gpu = None  # blocks mapped to "cpu" compress on the map's GPU (with its codecs), to run there
        if self._device_map and "cpu" in {str(v) for v in self._device_map.values()}:
            from .offload import map_gpu

            self._map_gpu = map_gpu(self._device_map)
        cfg = self.quantization_config
        if self._map_gpu is None and getattr(cfg, "offload", None) is not None and torch.cuda.is_available():
            self._map_gpu = torch.device(cfg.offload_device or "cuda")  # read onto the host, placed there later

    def update_dtype(self, dtype):
        return dtype

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        module, attr = _module_of(model, param_name)
        if isinstance(module, CompressedLinear) and attr == "weight":  # a placeholder: what it will take
            return 1.0 if module.mode != "lossless" else 0.7 * param.element_size()
        return super().param_element_size(model, param_name, param)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = unexpected | {re.escape(SENTINEL)}
        if self.pre_quantized:
            self._prepare_load(model, checkpoint_files, device_map)
        else:
            self._prepare_compress(model)
        return model

    def _prepare_compress(self, model) -> None:
        cfg = self.quantization_config
        if cfg.strict:  # the checkpoint is a plain one: transformers' own loading reads it, and its report
            raise ValueError("CupycodecConfig(strict=True) refuses compressed checkpoints that lack tensors; this "
                             "checkpoint is not compressed (it is compressed while loading), and transformers "
                             "loads it: drop strict, and see what is missing with from_pretrained(..., "
                             "output_loading_info=True)")
        self._t0 = time.perf_counter()
        self._swapped, self._converted = [], set()  # layers made empty here, and those whose weight came in
        skip = self.get_modules_to_not_convert(model, cfg.modules_to_not_convert, model._keep_in_fp32_modules,
                                               add_default_skips=True)
        alone = _left_alone_by_default(model)  # the head and tied weights, as compress_model finds them
        torch_reads, code_reads = _read_by_torch(model), _read_by_code(model)
        chosen = 0
        for fqn, m in list(model.named_modules()):
            if not _is_linear(m):
                continue
            why = (alone[id(m.weight)] if id(m.weight) in alone else
                   torch_reads.get(id(m)) if id(m) in torch_reads else
                   sub if (sub := replaced_why_not(m)) is not None else
                   "modules_to_not_convert" if not should_convert_module(fqn, skip) else
                   "modules_to_convert" if cfg.modules_to_convert and
                   not any(re.search(p, fqn) for p in cfg.modules_to_convert) else code_reads.get(id(m)))
            if why is not None:
                self._skipped[fqn] = why
                continue
            chosen += 1
            layer = CompressedLinear(m.in_features, m.out_features, m.bias is not None, mode=cfg.mode,
                                     granularity=cfg.granularity, group_size=cfg.group_size, dtype=m.weight.dtype,
                                     device="meta")
            layer.weight = torch.nn.Parameter(torch.empty_like(m.weight, device="meta"), requires_grad=False)
            set_module(model, fqn, layer)
            self._swapped.append(fqn)
        self._skipped.update(fused_weights(model))
        if not chosen:
            by_why: dict[str, list[str]] = {}
            for fqn, why in self._skipped.items():
                by_why.setdefault(why, []).append(fqn)
            left = "; ".join(f"{why}: {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                             for why, names in by_why.items())
            raise ValueError(f"quantization_config chose none of {type(model).__name__}'s Linear layers (left alone, "
                             f"by reason: {left}){conv1d_note(model)}")

    def _prepare_load(self, model, checkpoint_files, device_map) -> None:
        ckpt = _open_checkpoint(checkpoint_files)
        directory = ckpt.directory
        self._ckpt = ckpt
        cfg = self.quantization_config
        try:
            self._mac_key = _trust(ckpt.table, cfg.trusted, cfg.key)
        except AuthenticationError as exc:  # which checkpoint: the directory in front
            prefix_message(exc, str(directory))
            raise
        self._trusted = cfg.trusted or self._mac_key is not None
        written_with = getattr(cfg, "checkpoint", None)  # save_compressed's config.json says which save it is of
        if written_with is not None and written_with != ckpt.table.checkpoint:
            raise FormatError(f"{directory}: its config.json was written by another save than its weights (checkpoint "
                              f"ids {written_with} and {ckpt.table.checkpoint}): a save into this directory while it "
                              "was read, or files of two saves; load it again once saving is done, or save again")
        cfg.checkpoint = None  # the loaded model's config: a later save_pretrained writes its own weights' table
        swapped = []
        for fqn, layer_cfg in ckpt.table.layers.items():
            where = f"{directory}: layer {fqn!r}"
            try:
                module = model.get_submodule(fqn)
            except AttributeError:
                saved = (getattr(model.config, "architectures", None) or [None])[0]
                hint = (f"; the checkpoint was saved from a {saved}, whose names it holds: load it with that class "
                        f"(transformers.{saved}.from_pretrained, or the AutoModelFor... class of its head), and take "
                        f"its .{getattr(model, 'base_model_prefix', 'model')} for the base model"
                        if saved and saved != type(model).__name__ else "")
                raise ValueError(f"{where} is not in this {type(model).__name__}{hint}") from None
            if not _is_linear(module):
                continue  # _plan names what is there instead
            try:
                layer = CompressedLinear.from_config(layer_cfg, device="meta")
            except ValueError as exc:
                raise FormatError(f"{where}: {exc}") from None
            # config.json built the model: a layer of another shape is a config.json of another model (or edited),
            # which transformers refuses for plain weights, and which would load here and fail at forward, or not
            if (module.in_features, module.out_features, module.bias is not None) != \
                    (layer.in_features, layer.out_features, layer.bias is not None):
                raise ValueError(f"{where} holds a Linear({layer.in_features}, {layer.out_features}, "
                                 f"bias={layer.bias is not None}); the model that config.json describes has "
                                 f"Linear({module.in_features}, {module.out_features}, "
                                 f"bias={module.bias is not None}) there (a config.json of another model?)")
            # A stand-in for the weight some models' _init_weights write (T5's: module.q.weight), flagged as
            # initialized so that transformers' init functions leave it alone; a plain attribute, so no state dict
            # key (removed after loading, with compress-while-loading's placeholders)
            stand_in = torch.empty(layer.out_features, layer.in_features, dtype=layer.weight_dtype, device="meta")
            stand_in._is_hf_initialized = True
            layer.__dict__["weight"] = stand_in
            set_module(model, fqn, layer)
            swapped.append(fqn)
        _untie(model, swapped)
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map or "cpu"}
        # "auto", "balanced", "balanced_low_0" and "sequential" are resolved by transformers after this call, onto
        # the GPUs first when there are any: decided here as the CPU, an untrusted checkpoint skipped the refusal
        # that GPU payloads get before anything is read (and the GPU CRC pass was off)
        resolved_later = any(d in _DEVICE_MAP_STRATEGIES for d in devices if isinstance(d, str))
        device = torch.device("cuda") if any("cuda" in str(d) or isinstance(d, int) for d in devices) or \
            (resolved_later and torch.cuda.is_available()) else torch.device("cpu")
        self._plan = _plan(ckpt, model, device, self._trusted, strict=cfg.strict)
        self._checks = Checks()  # CRCs and MACs of the tensors transformers hands over, on worker threads
        # tensors bound for a GPU: their CRCs checked there, once transformers has placed them all
        self._placed = PlacedChecks() if device.type == "cuda" else None

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        """A compressed layer's placeholder weight (compressed while loading) and its container buffer, whose size
        the checkpoint, not the empty layer, knows (transformers >= 5.2x asks this before accepting a tensor of
        another shape; it quantizes only when the checkpoint is not pre-quantized)."""
        module, attr = _module_of(model, param_name)
        if not isinstance(module, CompressedLinear):
            return False
        return attr == "packed" or (attr == "weight" and not self.pre_quantized)

    def get_quantize_ops(self):
        return _Compress(self)

    def get_weight_conversions(self):
        if not self.pre_quantized or self._ckpt is None:
            return []
        # One converter for every stored tensor, whose target is the key it matched (\1). Its source matches any
        # key: a converter sees only the files' keys, and those are the table's (Checkpoint checks it) and the
        # sentinel, which no model holds, so transformers leaves it out. One converter per key cost ~0.4 s on a
        # 272-tensor model (transformers tries each key against each converter in turn, and builds and compiles
        # every one); one whose source was the alternation of the escaped keys took 20-27 ms of every load of
        # SmolLM2's 482 tensors on two cores, compiling it (twenty-second session).
        return [WeightConverter(["^(.+)$"], [r"\1"], [_Load(self)], force_cpu=True)]

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._error is not None:  # a conversion failed (see _Op.convert): its error, as it was raised
            self._abandon()
            error, self._error = self._error, None
            raise error
        if self._checks is not None:  # every CRC and MAC of the checkpoint, before the model is handed out
            checks, self._checks = self._checks, None
            placed, self._placed = self._placed, None
            if placed is not None:  # CRCs first: an accident reads as a checksum error, a forgery as a bad MAC
                try:
                    placed.run(lambda name: _tensor_of(model, name))
                except BaseException:
                    checks.abandon()
                    raise
            checks.wait()
        if self._ckpt is not None:  # tensors stored once under another name: transformers loaded the source only
            tie_aliases(model, self._ckpt.table.aliases)
        if not self.pre_quantized:
            _check_compressed_while_loading(model, self._swapped, self._converted)
        blocks = install(model, {})
        if not self.pre_quantized:  # what compress-while-loading did, as compress_model reports it
            trim_heap()  # its loader threads' temporaries, held as free heap memory
            model.cupycodec_report = CompressionReport(self.quantization_config.mode, self._reports,
                                                       time.perf_counter() - self._t0, self._skipped, blocks=blocks)
        conv = getattr(model, "_weight_conversions", None)
        if conv:  # ours were for loading only: saving writes the model's own tensors
            model._weight_conversions = [c for c in conv if not any(isinstance(o, _Op) for o in
                                                                    getattr(c, "operations", ()))]
        self._ckpt = self._plan = None
        cfg = self.quantization_config
        device_map = getattr(model, "hf_device_map", None) or getattr(self, "_device_map", None)
        mapped = None
        places = {str(v) for v in device_map.values()} if isinstance(device_map, dict) else set()
        if "cpu" in places and places - {"cpu", "disk", "meta"}:  # blocks on the host, and a GPU to stream them to
            from .offload import place_mapped

            mapped = model.cupycodec_offload = place_mapped(model, device_map)
        if mapped is None and getattr(cfg, "offload", None) is not None:
            from .offload import offload_model

            model.cupycodec_offload = offload_model(model, cfg.offload, max_gpu_memory=cfg.max_gpu_memory,
                                                    device=cfg.offload_device)
        # The empty placeholders of compress-while-loading go last: accelerate's hooks on blocks mapped to "cpu"
        # (removed by place_mapped above) put back every tensor they saw at dispatch, these included.
        for m in model.modules():
            if isinstance(m, CompressedLinear):
                m._parameters.pop("weight", None)
                m.__dict__.pop("weight", None)
        return model

    def is_serializable(self) -> bool:
        return True

    def dequantize(self, model, dtype=None):
        """As transformers' :meth:`~transformers.quantizers.HfQuantizer.dequantize`, but without its default of
        ``model.config.dtype``, which is stale after a ``.to()`` or a model built in another dtype (weights came back
        bf16 in a float32 model, whose next forward raised), and a string after ``save_pretrained`` (a foreign
        "Invalid device string"): by default each weight comes back in the dtype the model computes in."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dequantize(dtype={dtype!r}): give a floating-point torch dtype, or none (the model's)")
        model = self._dequantize(model, dtype=dtype)
        self.remove_quantization_config(model)
        return model

    def _dequantize(self, model, dtype=None):
        """``model.dequantize()``: every compressed layer back to an ``nn.Linear`` with its decoded weight (the
        original bits for lossless, the dequantized weight for the INT8 modes; in ``dtype``, by default the one
        the model computes in, which holds a lossless weight's values exactly when it is as wide), keeping
        its bias Parameter. Every weight is decoded before any module changes, so a failure (out of memory) leaves
        the model compressed; transformers then drops the quantization config. A model with blocks offloaded to the
        host is refused: its weights would land in host memory beside a GPU placement."""
        found = [(fqn, m) for fqn, m in model.named_modules(remove_duplicate=False) if isinstance(m, CompressedLinear)]
        offloaded = [fqn for fqn, m in found if m._offloaded]
        if offloaded:
            raise ValueError(f"dequantize() of a model offloaded to the host ({offloaded[0]}, ...): load or compress "
                             "it without offload, then dequantize")
        if dtype is None:
            dtype = getattr(model, "dtype", None)  # what the model computes in now (after any .to())
            dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
        plain: dict[int, torch.nn.Linear] = {}
        for _, m in found:
            if id(m) in plain:
                continue
            with torch.no_grad():
                w = m.decompress_weight()
                if dtype is not None and w.dtype != dtype and w.is_floating_point():
                    w = w.to(dtype)
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
            lin.weight = torch.nn.Parameter(w)
            lin.bias = m.bias
            plain[id(m)] = lin
        for fqn, m in found:
            set_module(model, fqn, plain[id(m)])
        held = model.__dict__.pop("_cupycodec_runtime", None)
        for h in held[1] if held is not None else ():
            h.remove()
        return model

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        """Whether ``generate`` may compile the decode step (transformers does so for a static cache on a GPU, with
        ``mode="reduce-overhead"``, and asks the quantizer first; its default is no). Every mode compiles as one
        graph (decoded layers are one op each, INT8 layers the INT8 op), and HF's compiled decoding was tested on
        a GPU for each; a model with blocks offloaded to the host was not, so it decodes uncompiled (the offload
        code sets ``offloaded`` on the model's quantizer)."""
        return not self.offloaded

    def get_state_dict_and_metadata(self, model):
        variant = (_save_call(model) or {}).get("variant")
        if variant is not None:  # refused before transformers writes anything
            raise ValueError(f"save_pretrained(variant={variant!r}) names the files model.{variant}.safetensors, "
                             "which no loader of compressed checkpoints reads; save without variant, into a "
                             "directory of its own")
        if (_save_call(model) or {}).get("state_dict") is not None:
            raise ValueError("save_pretrained(state_dict=...) of a compressed model: the checkpoint is written from "
                             "the model's own layers (a compressed checkpoint must agree with its table); change the "
                             "model itself, or save the state dict with safetensors directly")
        key = _signing.local_key(create=True)
        tensors, metadata = checkpoint_state(model, key=key)
        _clear_earlier_save(model, tensors)
        # The table names the model's own keys; transformers would rename the tensors to the model's original
        # format after this (GPT-NeoX's lm_head -> embed_out), and the files and the table would disagree. A
        # compressed checkpoint keeps the model's names, as save_compressed writes them and every loader reads them.
        model._weight_conversions = []
        return tensors, metadata


def _check_compressed_while_loading(model, swapped: list[str], converted: set[str]) -> None:
    """What transformers would initialize in an nn.Linear the checkpoint lacks, for the CompressedLinear layers put
    in their place (its ``_init_weights`` does not know them; they held uninitialized memory): a missing weight is
    an error (there is nothing to compress), a missing bias is zeroed, as transformers' models initialize one."""
    missing = [fqn for fqn in swapped if fqn not in converted]
    if missing:
        names = ", ".join(missing[:5]) + (f", ... ({len(missing)} in all)" if len(missing) > 5 else "")
        raise ValueError(f"the checkpoint holds no weight for {names}: compress-while-loading needs every weight it "
                         "compresses (does config.json describe more layers than the checkpoint has?); load the model "
                         "without quantization_config, initialize what is missing, then compress_model()")
    for fqn in swapped:
        bias = model.get_submodule(fqn).bias
        if bias is not None and not getattr(bias, "_is_hf_initialized", False):
            with torch.no_grad():
                bias.zero_()


def _open_checkpoint(checkpoint_files) -> Checkpoint:
    """The checkpoint whose files transformers chose, its table read (its files closed again: transformers reads
    the tensors). transformers joins an index's entries to the directory unchecked, so an entry
    ``../other/model.safetensors`` puts a file in another directory; the reader refuses that (and any file of
    another name than its own choice), as :func:`load_compressed` does."""
    if not checkpoint_files:
        raise ValueError("a cupycodec checkpoint needs its safetensors files")
    directories = sorted({os.path.normpath(os.path.dirname(os.fspath(f))) for f in checkpoint_files})
    if len(directories) != 1:
        raise FormatError(f"{INDEX} names shards outside the checkpoint directory: the files transformers was "
                          f"given are in {', '.join(directories)}")
    ckpt = Checkpoint(directories[0])
    ckpt.close()  # transformers reads the tensors; the table is what is needed here
    given = sorted(os.path.basename(os.fspath(f)) for f in checkpoint_files)
    if given != sorted(ckpt.files):
        raise FormatError(f"{ckpt.directory}: transformers reads {given[:3]}, its checkpoint is {ckpt.files[:3]} "
                          "(files of another save left there? save it again into an empty directory)")
    return ckpt


def _untie(model, fqns) -> None:
    """Drop transformers' ties of the weights of compressed layers ``fqns``. An output head tied to the embedding and
    compressed anyway (``compress_model`` with a ``filter_fn`` that takes it) holds a compressed copy of its own,
    stored as a layer apart from the embedding; tied, transformers would reach for its ``weight`` (which a
    :class:`CompressedLinear` has not) when loading it or tying weights again. ``config.json`` keeps saying tied: some
    models read that flag in their forward (T5 scales its logits), and the model should compute as it did."""
    tied = getattr(model, "all_tied_weights_keys", None)
    if not isinstance(tied, dict) or not tied:
        return
    weights = {f"{fqn}.weight" for fqn in fqns}
    for target, source in list(tied.items()):
        if target in weights or source in weights:
            del tied[target]


def _save_call(model) -> dict | None:
    """The local variables of the ``save_pretrained`` call on the stack that is saving ``model`` (transformers tells
    a quantizer nothing of the save), or None."""
    frame = sys._getframe(2)
    while frame is not None and not (frame.f_code.co_name == "save_pretrained" and
                                     frame.f_locals.get("self") is model):
        frame = frame.f_back
    if frame is None:
        return None
    local = dict(frame.f_locals)
    del frame
    return local


_AFTER_SAVE = "barrier_after_gathered_checkpoint_save"  # the last call of transformers' save_pretrained (>= 5.2x)


_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named device maps


def _clear_earlier_save(model, tensors: dict) -> None:
    """Remove the file of the other layout from the directory ``save_pretrained`` is saving ``model`` into, once the
    save has succeeded: after a sharded save, a stale ``model.safetensors`` of an earlier one-file save is what
    transformers (and so this reader) would load; after a one-file save, a stale index names shards that
    transformers removes. transformers removes the shards of an earlier save that it does not overwrite, but not
    these two. Removed before transformers wrote anything, a save that then failed (an invalid generation config, a
    read-only config.json, a full disk) lost the checkpoint it was replacing: a sharded save writes its index last,
    so until then the earlier ``model.safetensors`` is the checkpoint that loads, as with plain transformers.
    Whether transformers will shard is worked out as it does (its size rule, its ``max_shard_size``); it only
    drops tensors from what it is given, so a save predicted one-file is. transformers tells a quantizer nothing of
    the save, so the directory is taken from the ``save_pretrained`` call on the stack; with none there (another
    caller), nothing is removed."""
    model.__dict__.pop(_AFTER_SAVE, None)  # left by an earlier save that failed
    local = _save_call(model)
    if local is None:
        return
    directory = local.get("save_directory")
    # a variant's files have other names, an adapter save (PEFT) writes adapter files only, and other ranks of a
    # distributed save write nothing
    if directory is None or local.get("variant") is not None or local.get("_hf_peft_config_loaded") or \
            not local.get("save_on_this_rank", True):
        return
    from huggingface_hub import split_torch_state_dict_into_shards

    sharded = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=local.get("max_shard_size", "50GB")).is_sharded
    path = os.path.join(os.fspath(directory), WEIGHTS if sharded else INDEX)
    if callable(getattr(type(model), _AFTER_SAVE, None)):
        model.__dict__[_AFTER_SAVE] = _RemoveAfterSave(model, path)  # shadows the method for this one call
    else:  # an older transformers calls nothing after writing: removed now, as it always was there
        _remove_file(path)


class _RemoveAfterSave:
    """Stands in for the model's ``barrier_after_gathered_checkpoint_save`` during one ``save_pretrained``, which
    calls it after every file was written: removes ``path``, then goes on to the method. A save that fails never
    calls it, and the next save replaces it; a plain object (not a closure), so a model holding it still pickles."""

    def __init__(self, model, path: str):
        self.model, self.path = model, path

    def __call__(self, *args, **kwargs):
        model = self.model
        model.__dict__.pop(_AFTER_SAVE, None)
        _remove_file(self.path)
        return getattr(type(model), _AFTER_SAVE)(model, *args, **kwargs)


def _remove_file(path: str) -> None:
    if os.path.isfile(path) or os.path.islink(path):  # a link: unlinked, never written through
        os.unlink(path)


def _tensor_of(model, name: str) -> torch.Tensor:
    """The parameter or buffer ``name`` of ``model`` as it is now."""
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, attr)


def _module_of(model, name: str):
    owner, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(owner) if owner else model), attr
    except AttributeError:
        return None, attr


def stage_configs(model, directory: str, table: dict) -> dict:
    """``config.json`` (with this checkpoint's ``quantization_config``) and ``generation_config.json``, written
    beside their targets and not yet renamed (:func:`cupycodec._files.stage_write`): {file name: staged file}.
    Both are serialized before either is written; whatever fails here leaves the directory as it was."""
    from cupycodec._files import stage_write

    qc = _summary_config(list(table["layers"].values()))
    qc.checkpoint = table["checkpoint"]  # which save's weights this config goes with (see _prepare_load)
    config = copy.deepcopy(model.config)
    config.quantization_config = qc
    if hasattr(model, "dtype"):
        config.dtype = str(model.dtype).rpartition(".")[2]
    config.architectures = [type(model).__name__]
    texts = {"config.json": config.to_json_string(use_diff=True).encode()}
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        texts["generation_config.json"] = gen.to_json_string(use_diff=True).encode()
    staged = {}
    try:
        for name, text in texts.items():
            staged[name] = stage_write(os.path.join(directory, name), lambda tmp, text=text: _write_bytes(tmp, text))
    except BaseException:
        for f in staged.values():
            f.discard()
        raise
    return staged


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _summary_config(layers: list[dict], codec: str | None = None) -> CupycodecConfig:
    """The ``quantization_config`` of a model whose compressed layers have these configs: what most of them are
    (each layer's own entry rules loading; this tells readers of config.json what the model holds)."""
    from collections import Counter

    mode = Counter(cfg["mode"] for cfg in layers).most_common(1)[0][0] if layers else "lossless"
    first = next((cfg for cfg in layers if cfg["mode"] == mode), {"granularity": "channel", "group_size": 128})
    return CupycodecConfig(mode=mode, granularity=first["granularity"], group_size=first["group_size"], codec=codec)


def attach(model, mode: str, granularity: str, group_size: int, codec: str | None) -> None:
    """Give a transformers model compressed by :func:`compress_model` the quantizer and ``quantization_config``
    that ``save_pretrained`` needs: the call's settings, or where earlier calls compressed most of the layers
    another way, what most of them are (as ``save_compressed`` writes it)."""
    layers = [m.config() for m in model.modules() if isinstance(m, CompressedLinear)]
    cfg = _summary_config(layers, codec)
    if (cfg.mode, cfg.granularity, cfg.group_size) == (mode, granularity, group_size):
        cfg = CupycodecConfig(mode=mode, granularity=granularity, group_size=group_size, codec=codec)
    # on a copy of the config: models built from one config object share it, and an uncompressed one's
    # save_pretrained wrote this quantization_config beside plain weights (a checkpoint nothing loads)
    config = copy.copy(model.config)
    config.quantization_config = cfg
    model.config = config
    model.hf_quantizer = CupycodecHfQuantizer(cfg, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    _untie(model, [fqn for fqn, m in model.named_modules() if isinstance(m, CompressedLinear)])


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """transformers' progress bars off while loading, when ``enabled`` is False (they are a process-wide setting,
    put back as it was)."""
    import transformers

    on = transformers.utils.logging.is_progress_bar_enabled()
    if on and not enabled:
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if on and not enabled:
            transformers.utils.logging.enable_progress_bar()


def _local_model_dir(directory: str, what: str, *, not_a_dir: str = "", no_config: str = "") -> None:
    """Refuse a ``directory`` that is not a local one with a ``config.json``, with the hint that fits: transformers
    would look a name that is not a directory up on the Hugging Face Hub (retrying for tens of seconds offline);
    and one whose ``config.json`` names no model class list (:func:`_check_architectures`)."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory!r} is not a directory: {what} takes a local model directory{not_a_dir}")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise FileNotFoundError(f"{directory} has no config.json, so it is not a transformers model directory"
                                f"{no_config}")
    _check_architectures(directory)  # before transformers parses it: some versions refuse a bad value their own way


def from_pretrained(directory: str, *, device=None, trusted: bool = False, key=None, strict: bool = False,
                    progress: bool = True, **kwargs):
    """Load a transformers checkpoint of cupycodec's with the class its ``config.json`` names, onto ``device``.

    ``strict``: refuse a checkpoint that lacks tensors of the model ``config.json`` describes (before reading any);
    ``progress``: False hides transformers' progress bars.
    """
    import transformers

    directory = os.fsdecode(directory)
    _local_model_dir(directory, "loading a compressed checkpoint", no_config=(
        "; a checkpoint of a model that is not a transformers model (save_compressed of a torch.nn.Module) loads "
        "into that model: load_compressed(directory, model=the model, built as it was saved)"))
    config = transformers.AutoConfig.from_pretrained(directory)
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method != QUANT_METHOD:
        if _has_cupycodec_table(directory):  # weights of a cupycodec save beside a config.json of plain weights
            raise ValueError(f"{directory}: its weights are a cupycodec checkpoint, but its config.json has no "
                             "quantization_config with quant_method 'cupycodec' (replaced by the original model's?); "
                             "put back the config.json it was saved with, or load it into a model you build: "
                             "load_compressed(directory, model)")
        raise ValueError(f"{directory} is not a cupycodec checkpoint (its config.json has no quantization_config "
                         f"with quant_method 'cupycodec'); load it with transformers")
    cls = _model_class(config, directory)
    if device is not None:
        kwargs.setdefault("device_map", {"": _work_device(device)})  # an unusable device named now
    elif torch.cuda.is_available():
        kwargs.setdefault("device_map", {"": f"cuda:{torch.cuda.current_device()}"})
    with warnings.catch_warnings(), _progress_bars(progress):
        # "you passed a quantization_config ... loading attributes will be overwritten"
        warnings.filterwarnings("ignore", message=".*quantization_config.*")
        return cls.from_pretrained(directory, quantization_config=CupycodecConfig(trusted=trusted, key=key,
                                                                                  strict=strict), **kwargs)


def _model_class(config, directory: str):
    """The transformers model class ``config.json``'s ``architectures`` names (AutoModelForCausalLM where it names
    none, or one this transformers lacks). Only a model class: the name is looked up in the transformers module,
    where "GenerationConfig" or "pipeline" would have built something else, whose loading checks no MAC."""
    import transformers

    archs = getattr(config, "architectures", None)
    if not archs:
        return transformers.AutoModelForCausalLM
    arch = archs[0] if isinstance(archs, list) else None
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else arch
    if cls is None and arch is not None:
        return transformers.AutoModelForCausalLM
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)) or \
            cls is transformers.PreTrainedModel:
        raise _no_model_class(archs, directory)
    return cls


def _has_cupycodec_table(directory: str) -> bool:
    """Whether the directory's safetensors files carry a cupycodec table (whatever its config.json says)."""
    try:
        with Checkpoint(directory):
            return True
    except (OSError, ValueError):  # no checkpoint of ours (plain safetensors: "not a cupycodec checkpoint"), or broken
        return False


def _check_architectures(directory: str) -> None:
    """Refuse a ``config.json`` whose ``architectures`` is not a list of class names, read as JSON before transformers
    parses it (transformers 5.17 raises a validation error of huggingface_hub's there, later ones take it)."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            archs = json.load(f).get("architectures")
    except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object: transformers says so
        return
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise _no_model_class(archs, directory)


def _no_model_class(archs, directory: str) -> FormatError:
    return FormatError(f"{os.path.join(directory, 'config.json')}: its \"architectures\" ({archs!r}) names no "
                       "transformers model class (a subclass of PreTrainedModel, such as LlamaForCausalLM); write the "
                       "model's class there, as save_pretrained does, or load the checkpoint into a model you build: "
                       "load_compressed(directory, model)")


def compress_checkpoint(input_dir, output_dir, *, mode: str, granularity: str = "channel", group_size: int = 128,
                        codec: str | None = None, modules_to_convert: list[str] | None = None,
                        modules_to_not_convert: list[str] | None = None, device=None, max_shard_size=DEFAULT_SHARD_SIZE,
                        key=None, progress: bool = True) -> CompressionReport:
    """Compress a transformers model directory into a compressed checkpoint (``cupycodec compress-model``).

    The weights are compressed one by one as they load (the model never holds them uncompressed), then written
    with :func:`~cupycodec.integrations.torch.save_compressed`; the directory's other files (tokenizer, chat
    template, ..., in subfolders too; not other weight files) are copied. Returns the :class:`CompressionReport`.
    """
    import shutil

    import transformers

    from cupycodec._files import atomic_write_path

    from .checkpoint import _check_output_directory, _shard_nbytes, save_compressed

    input_dir, output_dir = os.fsdecode(input_dir), os.fsdecode(output_dir)
    # checked before the model loads and compresses, which takes minutes; save_compressed checks them only after
    _shard_nbytes(max_shard_size)
    _check_output_directory(output_dir)
    # checked before anything loads: a Hub id (or a typo) would go to huggingface.co, and the copy of the other
    # files below reads the input directory once the output is written
    _local_model_dir(input_dir, "compress-model", not_a_dir=" (a model on the Hugging Face Hub: download it "
                     "first, e.g. hf download ID --local-dir DIR)")
    if os.path.realpath(input_dir) == os.path.realpath(output_dir) or \
            (os.path.exists(output_dir) and os.path.samefile(input_dir, output_dir)):  # a link to it, too
        raise ValueError("compress-model writes a new directory; give an output other than the input")
    device = _work_device(device)
    config = transformers.AutoConfig.from_pretrained(input_dir)
    if getattr(config, "quantization_config", None) is not None:
        qc = config.quantization_config
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise ValueError(f"{input_dir} is already quantized ({method}); compress-model takes bf16/fp16/fp32 models")
    cls = _model_class(config, input_dir)
    qc = CupycodecConfig(mode=mode, granularity=granularity, group_size=group_size, codec=codec,
                         modules_to_convert=modules_to_convert, modules_to_not_convert=modules_to_not_convert)
    with _progress_bars(progress):
        model = cls.from_pretrained(input_dir, quantization_config=qc, device_map={"": device}, dtype="auto")
    others = _other_files(input_dir, output_dir)  # listed before the output exists: it may lie inside the input
    written = set(save_compressed(model, output_dir, max_shard_size=max_shard_size, key=key))
    for rel in (rel for rel in others if rel not in written):
        src, dst = os.path.join(input_dir, rel), os.path.join(output_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        atomic_write_path(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
    return model.cupycodec_report


_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|gguf|h5|msgpack|ckpt|onnx)$|.*\.index\.json$")


def _other_files(input_dir: str, output_dir: str) -> list[str]:
    """The files of a model directory that :func:`compress_checkpoint` copies, as paths relative to it: every file
    in it and in its subfolders (a tokenizer or an ``original/`` folder) except weights, the two configs the
    compressed checkpoint writes itself, hidden entries (``.git``, ``.cache``) and the output directory where it
    lies inside the input (its checkpoint was copied into itself, one folder deeper each run). Linked files are
    copied as files; linked folders are not followed (a link may point back up the tree)."""
    out = os.path.realpath(output_dir)
    found = []
    for top, dirs, files in os.walk(input_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(os.path.join(top, d)) != out)
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(top, name), input_dir)
            if name.startswith(".") or _WEIGHT_FILE.match(name) or \
                    rel in ("config.json", "generation_config.json") or not os.path.isfile(os.path.join(top, name)):
                continue
            found.append(rel)
    return found


def _work_device(device) -> str:
    """``device`` to compress or load on (default: the first GPU when usable, else the CPU), refused here when
    unusable (:func:`~.dlpack.usable_device`)."""
    if device is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return str(usable_device(device))


def register() -> None:
    """Make transformers know ``quant_method: "cupycodec"`` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(CupycodecConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(CupycodecHfQuantizer)
    with contextlib.suppress(ImportError, AttributeError):  # so that from_pretrained's trusted=/key= reach the config
        from transformers.quantizers import auto

        if CupycodecConfig not in auto.LOADING_ATTRIBUTES_CONFIG_TYPES:
            auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, CupycodecConfig)


register()
