"""DINOv2 teacher: pinned weights, forward hooks, and the targets HASTE/REPA align to.

No edits to timm or torch.hub sources (the official code overwrites DINOv2 files in the hub
cache, SPEC §3.3). A forward hook on ``blocks[l].attn.qkv`` sees the (N, T, 3·D) projection;
q and k of the patch tokens give the pre-softmax logits ``scale · q kᵀ`` exactly, and the same
``forward_features`` call yields the final-norm patch tokens that REPA aligns to. The same hook
also sees the projection's input: the ``tokens-*`` codec stores those tokens and decodes q, k
through the projection weights (``Teacher.qk_params``), which it stores once per teacher group.
What the hook keeps is chosen by ``capture``, so a codec pays only for the outputs it encodes.
The ``stream-*`` codecs store the residual stream entering the first aligned block (a forward
pre-hook there) and, once per group, the frozen blocks from there on (``Teacher.stream_params``),
which the trainer reruns in pure torch (``pipeline.cache.codecs_blocks``).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache.codecs_blocks import BLOCK_ARRAYS, LN_EPS, block_forward, final_norm
from pipeline.encoders import weights

log = logging.getLogger(__name__)

DEFAULT_TEACHER = "timm/vit_base_patch14_dinov2.lvd142m"
DEFAULT_ARCH = "vit_base_patch14_dinov2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Random-init members of the DINOv2 family: full depth (layers 8-11 exist), small width.
RANDOM_PRESETS: dict[str, dict[str, Any]] = {
    "base": {},
    "tiny": {"embed_dim": 96, "num_heads": 12},
}


CAPTURES = frozenset({"q", "k", "x", "stream"})


@dataclass
class TeacherOut:
    feat: torch.Tensor              # (N, T, D) final-norm patch tokens, fp32
    q: torch.Tensor | None = None   # (N, L, H, T, hd) patch-token queries of the stored layers, fp32
    k: torch.Tensor | None = None   # (N, L, H, T, hd) patch-token keys
    x: torch.Tensor | None = None   # (N, L, T, D) patch tokens entering blocks[l].attn.qkv, fp32
    stream: torch.Tensor | None = None  # (N, P + T, D) residual stream entering blocks[min(layers)], fp32


def teacher_input_size(resolution: int) -> int:
    """224 at 256 px, 448 at 512 px (SPEC §3.2, Table 13): one 14-px patch per 16 image pixels."""
    if resolution % 16:
        raise ValueError(f"resolution {resolution} must be a multiple of 16 for a patch-14 teacher")
    return resolution * 14 // 16


def preprocess(images: torch.Tensor, input_size: int) -> torch.Tensor:
    """uint8 (N, 3, R, R) -> normalized float (N, 3, S, S): /255, normalize, THEN bicubic resize.

    The order matters and follows HASTE train.py L39-48 (normalize before resize, no antialias).
    """
    x = images.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return F.interpolate(x, size=(input_size, input_size), mode="bicubic", align_corners=False)


class Teacher:
    """Wraps a timm DINOv2 ViT; ``__call__(uint8 images) -> TeacherOut`` for the given layers.

    ``capture`` picks what the hooks keep: q and k (the default), and/or x, the qkv input tokens
    (only ``tokens-*`` caches need it), and/or the residual stream entering the first aligned block
    (``stream-*``). Capturing x checks up front that q, k are a linear map of x; capturing the
    stream, that the blocks from there on are DINOv2's (``codecs_blocks`` can rerun them).
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int], resolution: int,
                 capture: Collection[str] = ("q", "k")):
        self.model = model.eval().requires_grad_(False)
        depth = len(model.blocks)
        bad = [layer for layer in layers if not 0 <= layer < depth]
        if bad:
            raise ValueError(f"teacher layers {bad} out of range for a {depth}-block teacher")
        self.layers = tuple(layers)
        self.input_size = teacher_input_size(resolution)
        attn = model.blocks[0].attn
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.scale = float(attn.scale)
        self.embed_dim = model.embed_dim
        self.depth = depth
        fc1 = getattr(getattr(model.blocks[0], "mlp", None), "fc1", None)
        self.mlp_dim = fc1.out_features if isinstance(fc1, torch.nn.Linear) else 0
        self.num_prefix_tokens = model.num_prefix_tokens  # cls + registers, never assumed to be 1
        patch = model.patch_embed.patch_size[0]
        if self.input_size % patch:
            raise ValueError(f"teacher input {self.input_size} is not a multiple of the patch size {patch}")
        self.grid = self.input_size // patch
        self.capture = frozenset(capture)
        if not self.capture <= CAPTURES or ("q" in self.capture) != ("k" in self.capture):
            raise ValueError(f"teacher capture {sorted(self.capture)}: expected q and k together, and/or x, stream")
        if "x" in self.capture:
            for layer in self.layers:
                _require_linear_qk(model.blocks[layer].attn, layer)
        self._qkv: dict[int, torch.Tensor] = {}
        self._x: dict[int, torch.Tensor] = {}
        self._stream: list[torch.Tensor] = []
        for layer in self.layers if self.capture - {"stream"} else ():  # nothing captured: no hooks at all
            model.blocks[layer].attn.qkv.register_forward_hook(self._hook(layer))
        if "stream" in self.capture:
            for i in range(min(self.layers), depth):
                _require_dinov2_block(model.blocks[i], i)
            _require_layer_norm(model.norm, "the final norm")
            model.blocks[min(self.layers)].register_forward_pre_hook(lambda mod, args: self._stream.append(args[0]))

    def _hook(self, layer: int):
        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if "q" in self.capture:
                self._qkv[layer] = output
            if "x" in self.capture:
                self._x[layer] = inputs[0]  # a reference, no copy: norm1's output
        return hook

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, precision: str = "fp32") -> TeacherOut:
        from pipeline.encoders.vae import autocast

        x = preprocess(images.to(self.device), self.input_size)
        self._qkv.clear()
        self._x.clear()
        self._stream.clear()
        try:
            with autocast(x.device, precision):
                tokens = self.model.forward_features(x)          # (N, P + T, D), final norm applied
            p = self.num_prefix_tokens
            feat = tokens[:, p:].float()
            if feat.shape[1] != self.grid ** 2:
                raise RuntimeError(f"teacher produced {feat.shape[1]} patch tokens, expected {self.grid ** 2}")
            out = TeacherOut(feat=feat)
            if "q" in self.capture:
                out.q, out.k = self._patch_qk(p)
            if "x" in self.capture:
                # patch tokens only: qkv is per-token, so their q, k never read the prefix tokens' x
                out.x = torch.stack([self._x[layer][:, p:].float() for layer in self.layers], 1)
            if "stream" in self.capture:  # all tokens: the prefix tokens take part in every later block
                out.stream = self._stream[0].float()
            return out
        finally:
            self._qkv.clear()
            self._x.clear()
            self._stream.clear()

    def _patch_qk(self, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (N, L, H, T, hd) of the patch tokens from the captured projections."""
        qs, ks = [], []
        for layer in self.layers:
            attn = self.model.blocks[layer].attn
            n, t, _ = self._qkv[layer].shape
            qkv = self._qkv[layer].float().reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])     # identity for DINOv2; kept for generality
            qs.append(q[:, :, p:])                              # (N, H, T, hd): prefix tokens dropped
            ks.append(k[:, :, p:])
        return torch.stack(qs, 1), torch.stack(ks, 1)

    @torch.no_grad()
    def qk_params(self) -> dict[str, np.ndarray]:
        """The stored layers' q, k projections, head-split: ``qk_weight`` (L, 2, H, hd, D) and
        ``qk_bias`` (L, 2, H, hd) float32 (index 0 = q, 1 = k), what a ``tokens-*`` decode needs.

        Checked against the module itself on random tokens, so a qkv that is not a plain affine map
        (a wrapped or quantised Linear) is refused rather than decoded wrongly.
        """
        ws, bs = [], []
        hd_all = self.num_heads * self.head_dim
        for layer in self.layers:
            qkv = self.model.blocks[layer].attn.qkv
            _require_linear_qk(self.model.blocks[layer].attn, layer)
            w = qkv.weight.detach().float()[: 2 * hd_all]
            b = qkv.bias.detach().float()[: 2 * hd_all] if qkv.bias is not None else w.new_zeros(2 * hd_all)
            probe = torch.randn(3, w.shape[1], generator=torch.Generator().manual_seed(layer)).to(w)
            ref = qkv(probe.to(qkv.weight.dtype)).float()[:, : 2 * hd_all]
            if not torch.allclose(probe @ w.T + b, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6):
                raise ValueError(f"teacher block {layer}: attn.qkv is not the affine map of its weight and bias; "
                                 "the tokens-* codecs cannot decode it (use qk-int8)")
            ws.append(w.reshape(2, self.num_heads, self.head_dim, -1))
            bs.append(b.reshape(2, self.num_heads, self.head_dim))
        return {"qk_weight": torch.stack(ws).cpu().numpy(), "qk_bias": torch.stack(bs).cpu().numpy()}


    @torch.no_grad()
    def stream_params(self) -> dict[str, np.ndarray]:
        """Blocks min(layers) .. depth−1 and the final norm as float32 arrays (``codecs_blocks`` names,
        block axis first): what a ``stream-*`` decode runs. Checked against the model's own forward on
        a random stream, so a block that is not DINOv2's math is refused rather than decoded wrongly."""
        blocks = list(self.model.blocks)[min(self.layers):]
        arrays = {n: torch.stack([_block_array(b, n, self.embed_dim) for b in blocks]) for n in BLOCK_ARRAYS}
        arrays["norm_weight"] = self.model.norm.weight.detach().float()
        arrays["norm_bias"] = self.model.norm.bias.detach().float()
        w = self.model.norm.weight
        probe = torch.randn(2, self.num_prefix_tokens + 4, self.embed_dim,
                            generator=torch.Generator().manual_seed(0)).to(device=w.device, dtype=w.dtype)
        checks = [(f"block {min(self.layers) + i}", blk(probe).float(),
                   block_forward(probe.float(), arrays, i, num_heads=self.num_heads, scale=self.scale)[0])
                  for i, blk in enumerate(blocks)]  # each block alone: a scale the final norm hides still shows
        checks.append(("the final norm", self.model.norm(probe).float(), final_norm(probe.float(), arrays)))
        for where, ref, ours in checks:
            if not torch.allclose(ours, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-6):
                raise ValueError(f"teacher {where}: the stored block math does not reproduce the model's forward; "
                                 "the stream-* codecs cannot decode it (use tokens-int8)")
        return {n: a.cpu().numpy() for n, a in arrays.items()}


def _block_array(block: torch.nn.Module, name: str, dim: int) -> torch.Tensor:
    """One ``codecs_blocks.BLOCK_ARRAYS`` entry of a timm block, float32: LayerScale off = ones, no bias = zeros."""
    module_path, _, leaf = name.rpartition("_")
    module = block.get_submodule(module_path.replace("_", "."))
    value = getattr(module, leaf, None)
    if value is None:  # ls1/ls2 as Identity (no LayerScale), a Linear without bias
        size = module.out_features if isinstance(module, torch.nn.Linear) else dim
        value = torch.ones(dim) if leaf == "gamma" else torch.zeros(size)
    return value.detach().float()


def _require_layer_norm(norm: Any, where: str) -> None:
    if not (isinstance(norm, torch.nn.LayerNorm) and norm.eps == LN_EPS and norm.elementwise_affine):
        raise ValueError(f"teacher {where} is {norm!r}, not LayerNorm(eps={LN_EPS}) with weight and bias; "
                         "the stream-* codecs cannot rerun it (use tokens-int8)")


def _require_dinov2_block(block: torch.nn.Module, index: int) -> None:
    """The structure ``codecs_blocks.run_blocks`` reproduces (checked numerically by ``stream_params``)."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    checks = {
        "attn.qkv": isinstance(getattr(attn, "qkv", None), torch.nn.Linear),
        "attn.proj": isinstance(getattr(attn, "proj", None), torch.nn.Linear),
        "attn.q_norm/k_norm/norm": all(isinstance(getattr(attn, n, torch.nn.Identity()), torch.nn.Identity)
                                       for n in ("q_norm", "k_norm", "norm")),
        "attn.gate": getattr(attn, "gate", None) is None,
        "mlp (fc1, GELU, fc2)": isinstance(getattr(mlp, "fc1", None), torch.nn.Linear)
        and isinstance(getattr(mlp, "fc2", None), torch.nn.Linear)
        and isinstance(getattr(mlp, "act", None), torch.nn.GELU) and mlp.act.approximate == "none"
        and isinstance(getattr(mlp, "norm", torch.nn.Identity()), torch.nn.Identity),
        "ls1/ls2": all(isinstance(getattr(block, n, None), torch.nn.Identity) or hasattr(getattr(block, n, None), "gamma")
                       for n in ("ls1", "ls2")),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"teacher block {index}: {', '.join(bad)} not as in DINOv2; the stream-* codecs cannot "
                         "rerun it (use tokens-int8)")
    for n in ("norm1", "norm2"):
        _require_layer_norm(getattr(block, n, None), f"block {index} {n}")


def _require_linear_qk(attn: torch.nn.Module, layer: int) -> None:
    """q, k must be an affine map of each token's qkv input alone for the tokens-* codecs."""
    if not isinstance(getattr(attn, "qkv", None), torch.nn.Linear):
        raise ValueError(f"teacher block {layer}: attn.qkv is {type(getattr(attn, 'qkv', None)).__name__}, "
                         "not a Linear; the tokens-* codecs need q, k = x Wᵀ + b (use qk-int8)")
    for name in ("q_norm", "k_norm"):
        norm = getattr(attn, name, None)
        if norm is not None and not isinstance(norm, torch.nn.Identity):
            raise ValueError(f"teacher block {layer}: attn.{name} is {type(norm).__name__}, not an identity; "
                             "q, k are then no affine map of the stored tokens, so the tokens-* codecs cannot "
                             "decode them (use qk-int8)")


def load_teacher(name: str = DEFAULT_TEACHER, *, arch: str = DEFAULT_ARCH, layers: Sequence[int] = (8, 9, 10, 11),
                 resolution: int = 256, seed: int = 0, device: torch.device | str = "cpu",
                 capture: Collection[str] = ("q", "k")):
    """Return (Teacher, identity dict). Pretrained weights get their position embedding
    resampled to the teacher input size by timm's checkpoint filter (bicubic, antialiased).
    ``capture``: the hooked outputs ``Teacher.__call__`` returns (see ``Teacher``)."""
    import timm

    size = teacher_input_size(resolution)
    ref = weights.parse(name)
    if ref.kind == "random":
        model = weights.build_random(
            ref, RANDOM_PRESETS, seed, lambda **kw: timm.create_model(arch, pretrained=False, img_size=size, **kw),
            "teacher")
    else:
        model = _load_pretrained(timm, ref, arch, size)
    model = model.to(device)
    teacher = Teacher(model, layers, resolution, capture)
    identity = {
        "name": name, "source": ref.kind, "arch": arch, "class": f"timm.{type(model).__name__}",
        "weights_sha256": weights.state_dict_sha256(model),
        "params": sum(p.numel() for p in model.parameters()),
        "input_size": size, "embed_dim": teacher.embed_dim, "depth": len(model.blocks),
        "num_heads": teacher.num_heads, "num_prefix_tokens": teacher.num_prefix_tokens,
        "preprocess": "x/255 -> imagenet normalize -> bicubic resize (align_corners=False, no antialias)",
    }
    return teacher, identity


def _load_pretrained(timm: Any, ref: weights.WeightsRef, arch: str, size: int) -> torch.nn.Module:
    try:
        if ref.kind == "local":
            if not ref.path.is_file():
                raise weights.WeightsError(f"teacher weights must be a file (.pth/.safetensors), got {ref.path}")
            return timm.create_model(arch, pretrained=True, img_size=size,
                                     pretrained_cfg_overlay={"file": str(ref.path)})
        repo = ref.name.removeprefix("hf-hub:")
        weights.require_hub(repo, "teacher")
        model_name = "hf-hub:" + repo if "/" in repo else repo
        return timm.create_model(model_name, pretrained=True, img_size=size)
    except weights.WeightsError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise weights.WeightsError(
            f"could not load teacher weights {ref.name!r} as {arch}: {str(e).splitlines()[0] if str(e) else e!r}") from None
