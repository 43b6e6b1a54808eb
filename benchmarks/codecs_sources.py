"""What bench_codecs measures every codec on: exact fp32 teacher outputs, and stress stacks.

A *source* holds, for a few images, everything any codec encodes (q, k (N, L, H, T, hd), the qkv
inputs x (N, L, T, D), the residual stream (N, P + T, D) entering the first aligned block), the
group arrays its ``store_params`` takes (``Teacher.qk_params`` / ``Teacher.stream_params``), and
the exact targets: logits (N, L, H, T, T) and features (N, T, D).

- ``teacher_source``: the DINOv2-B architecture at random init on synthetic 256 px images. Its
  LayerScale is timm's init, 1e-5, so blocks 8-11 barely change the residual stream: it cannot
  show how errors of a stored stream grow through the blocks (stream-*), hence the stress stacks.
- ``stress_source``: four random DINOv2-shaped blocks with LayerScale 1 (every block changes the
  stream as much as it holds), Gaussian weights, zero biases, an i.i.d. Gaussian residual stream
  (flat spectrum: nothing low-rank to exploit), q/k weights scaled so that the first block's
  logits have the teacher's logit std; ``outliers`` stream channels x20 (the channel-outlier
  stress). Sharpness s multiplies every block's query weights: the attention is sharp *inside*
  the blocks, as a sharp trained teacher's is, so a stream codec's error passes through sharp
  softmaxes. For the codecs that store q, k, x or logits directly this equals sharpening the
  logits afterwards (the old stress); for stream-* it is the harder and more faithful test.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.cache.codecs import AttnCodec, get_codec
from pipeline.cache.codecs_blocks import block_shapes, run_blocks
from pipeline.cache.codecs_tokens import qk_from_tokens
from pipeline.cache.schema import TeacherSpec
from pipeline.encoders.teacher import load_teacher
from pipeline.inputs.synth import synth_image

LAYERS = (8, 9, 10, 11)


@dataclass
class Source:
    inputs: dict[str, torch.Tensor]                 # q, k, x, stream (batched)
    arrays: dict[str, dict[str, np.ndarray]]        # Teacher method name -> its group arrays
    logits: torch.Tensor                            # exact (N, L, H, T, T)
    feat: torch.Tensor                              # exact (N, T, D)
    info: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.feat.shape[0]


def teacher_source(n: int, device: torch.device) -> tuple[TeacherSpec, Source]:
    """Exact fp32 outputs of the random-init DINOv2-B on n synthetic 256 px images, and the spec."""
    teacher, _ = load_teacher("random:base", layers=LAYERS, resolution=256, device=device,
                              capture=("q", "k", "x", "stream"))
    imgs = torch.stack([torch.from_numpy(synth_image(i, 8, 256)[0]) for i in range(n)]).permute(0, 3, 1, 2)
    out = teacher(imgs.contiguous(), "fp32")
    spec = TeacherSpec(layers=LAYERS, num_heads=teacher.num_heads, head_dim=teacher.head_dim,
                       embed_dim=teacher.embed_dim, grid=teacher.grid, num_prefix_tokens=teacher.num_prefix_tokens,
                       scale=teacher.scale, depth=teacher.depth, mlp_dim=teacher.mlp_dim)
    q, k = out.q.cpu(), out.k.cpu()
    src = Source({"q": q, "k": k, "x": out.x.cpu(), "stream": out.stream.cpu()},
                 {"qk_params": teacher.qk_params(), "stream_params": teacher.stream_params()},
                 exact_logits(q, k, spec.scale), out.feat.cpu())
    return spec, src


def exact_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return get_codec("qk-fp32").decode({"q": q, "k": k}, scale)


def stress_blocks(spec: TeacherSpec, sharpness: float, target_std: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """The stress stack's arrays (``codecs_blocks`` names): see the module docstring."""
    g = torch.Generator().manual_seed(seed)
    d, m, blocks = spec.embed_dim, spec.mlp_dim, spec.depth - min(spec.layers)
    shapes = block_shapes(blocks, d, m)
    p = {n: torch.zeros(s) for n, s in shapes.items()}
    for n in ("norm1_weight", "norm2_weight", "ls1_gamma", "ls2_gamma", "norm_weight"):
        p[n] = torch.ones(shapes[n])
    # q·k over hd terms of variance c² each, times scale = hd^-1/2: logit std = c² at sharpness 1
    c = target_std ** 0.5
    p["attn_qkv_weight"] = torch.randn(shapes["attn_qkv_weight"], generator=g) / d ** 0.5
    p["attn_qkv_weight"][:, :d] *= c * sharpness
    p["attn_qkv_weight"][:, d:2 * d] *= c
    p["attn_proj_weight"] = torch.randn(shapes["attn_proj_weight"], generator=g) / d ** 0.5
    p["mlp_fc1_weight"] = torch.randn(shapes["mlp_fc1_weight"], generator=g) / d ** 0.5
    p["mlp_fc2_weight"] = torch.randn(shapes["mlp_fc2_weight"], generator=g) / m ** 0.5
    return p


def stress_source(spec: TeacherSpec, n: int, sharpness: float, target_std: float, outliers: int = 0) -> Source:
    """n i.i.d. Gaussian streams (``outliers`` channels x20) through the stress stack at ``sharpness``."""
    p = stress_blocks(spec, sharpness, target_std)
    g = torch.Generator().manual_seed(1)
    stream = torch.randn(n, spec.num_prefix_tokens + spec.num_tokens, spec.embed_dim, generator=g)
    stream[..., :outliers] *= 20
    pre, d, h, hd = spec.num_prefix_tokens, spec.embed_dim, spec.num_heads, spec.head_dim
    at = [layer - min(spec.layers) for layer in spec.layers]
    with torch.no_grad():
        out = run_blocks(stream, p, num_heads=h, scale=spec.scale, prefix=pre, logits_at=at, keep_normed=True)
    x = out.normed[:, :, pre:]                                                   # (N, L, T, D)
    w = p["attn_qkv_weight"][at, :2 * d].reshape(len(at), 2, h, hd, d)
    b = p["attn_qkv_bias"][at, :2 * d].reshape(len(at), 2, h, hd)
    q, k = qk_from_tokens(x, w, b)
    arrays = {"qk_params": {"qk_weight": w.numpy(), "qk_bias": b.numpy()},
              "stream_params": {k: v.numpy() for k, v in p.items()}}
    return Source({"q": q, "k": k, "x": x, "stream": stream}, arrays, out.logits, out.feat,
                  {"sharpness": sharpness, "outliers": outliers})


def stored_params(codec: AttnCodec, spec: TeacherSpec, src: Source) -> dict[str, torch.Tensor] | None:
    """The group arrays as a cache stores them (tokens-*: W R, b; stream-*: blocks, norm, basis)."""
    if not codec.params(spec):
        return None
    stored = codec.store_params(src.arrays[codec.teacher_arrays])
    return {n: torch.from_numpy(a) for n, a in stored.items()}


def encode_one(codec: AttnCodec, src: Source, i: int, scale: float) -> dict[str, np.ndarray]:
    """Image i as the writer stores it: the codec's inputs prepared (on the device), then encoded."""
    return codec.encode(*(codec.on_device(src.inputs[n][i]).numpy() for n in codec.inputs), scale)


def encoded_batch(codec: AttnCodec, spec: TeacherSpec, src: Source) -> dict[str, torch.Tensor]:
    enc = [encode_one(codec, src, i, spec.scale) for i in range(src.n)]
    return {m: torch.from_numpy(np.stack([e[m] for e in enc])) for m in enc[0]}


def decoded(codec: AttnCodec, spec: TeacherSpec, src: Source,
            batch: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(features, logits) decoded from the source's encoded batch; features only where the codec derives
    them. The codec object itself decodes (an ablation is no registered name ``decode_targets`` knows)."""
    batch = encoded_batch(codec, spec, src) if batch is None else batch
    params = stored_params(codec, spec, src)
    if codec.targets is not None:
        return codec.targets(batch, spec, params, None, True, True)
    return None, codec.decode(batch, spec.scale, params)
