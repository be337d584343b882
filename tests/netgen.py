"""Random small networks for the property tests: a hypothesis strategy draws a *spec* (plain lists, numbers and
strings, so a failing network prints as text that can be pasted into `@example(...)`), and `build(spec)` turns it
into a plain torch.nn model.

A spec is {"input": [...], "body": [blocks], "classes": k, "seed": s}; the model is nn.Sequential(body, Linear to
k classes), with weights and batch-norm statistics seeded by s.
  input   ["image", C, S]: samples (C, S, S) | ["vector", F]: (F,) | ["sequence", L, E]: (L, E)
  images  ["conv", out, kernel, groups, bn, relu], ["depthwise", multiplier, bn, relu], ["pool"] (top level only),
          ["residual", [blocks]] (x + f(x), f keeps the width), ["concat", [blocks], [blocks]] (torch.cat of two
          branches on channels; an empty branch is the identity, as in DenseNet), ["nested", [blocks]] (a Sequential
          in a Sequential), then a bridge to vectors: ["flatten"] (nn.Flatten), ["reshape"] (x.reshape in a custom
          module) or ["gap"] (global average pool)
  sequences  ["embed", width] (a Linear on the last dim), ["attention", heads, residual] (nn.MultiheadAttention in
          a custom module), then ["mean"] over the positions
  vectors ["linear", out, bn, relu], ["residual", [blocks]], ["concat", [blocks], [blocks]], ["nested", [blocks]]
"""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import strategies as st

MAX_WIDTH = 12  # channels or features of any layer: tiny nets keep 30 examples within seconds
MAX_FLAT = 96  # features after a flatten


# ----------------------------------------------------------------------------------------------- modules


class Residual(nn.Module):
    """x + body(x): a custom module around a Sequential."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Concat(nn.Module):
    """torch.cat of two branches along dim 1 (channels or features); an empty branch passes x through."""

    def __init__(self, left: nn.Module, right: nn.Module):
        super().__init__()
        self.left, self.right = left, right

    def forward(self, x):
        return torch.cat([self.left(x), self.right(x)], dim=1)


class Reshape(nn.Module):
    """x.reshape(N, -1): a flatten that the tracer sees as a reshape op, not an nn.Flatten."""

    def forward(self, x):
        return x.reshape(x.shape[0], -1)


class SelfAttention(nn.Module):
    """Multi-head self-attention on (N, L, E), optionally residual."""

    def __init__(self, width: int, heads: int, residual: bool):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.residual = residual

    def forward(self, x):
        out = self.attention(x, x, x, need_weights=False)[0]
        return x + out if self.residual else out


class MeanOverPositions(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


# ------------------------------------------------------------------------------------------------- build


def input_shape(spec: dict) -> tuple[int, ...]:
    kind, *dims = spec["input"]
    return (dims[0], dims[1], dims[1]) if kind == "image" else tuple(dims)


def build(spec: dict) -> nn.Module:
    """The model of a spec, in eval mode; weights and batch-norm statistics seeded by spec["seed"]."""
    torch.manual_seed(spec["seed"])
    kind, *dims = spec["input"]
    builder = _Builder(width=dims[-1] if kind == "sequence" else dims[0], size=dims[1] if kind == "image" else 1)
    body = builder.blocks(spec["body"])
    model = nn.Sequential(*body, nn.Linear(builder.width, spec["classes"]))
    # batch norms that are not the identity, so that a unit removed before one is not trivially exact
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.5, 0.5)
    return model.eval()


class _Builder:
    """Walks a spec's blocks, tracking the width (channels or features) and the spatial size."""

    def __init__(self, width: int, size: int):
        self.width, self.size = width, size

    def blocks(self, blocks: list) -> list[nn.Module]:
        return [module for block in blocks for module in self.block(block)]

    def block(self, block: list) -> list[nn.Module]:
        op, *args = block
        if op == "conv":
            channels, kernel, groups, bn, relu = args
            conv = nn.Conv2d(self.width, channels, kernel, padding=kernel // 2, groups=groups)
            self.width = channels
            return [conv, *self.norm_act(bn, relu, 2)]
        if op == "depthwise":
            multiplier, bn, relu = args
            conv = nn.Conv2d(self.width, self.width * multiplier, 3, padding=1, groups=self.width)
            self.width *= multiplier
            return [conv, *self.norm_act(bn, relu, 2)]
        if op == "linear":
            features, bn, relu = args
            linear = nn.Linear(self.width, features)
            self.width = features
            return [linear, *self.norm_act(bn, relu, 1)]
        if op == "pool":
            self.size //= 2
            return [nn.MaxPool2d(2)]
        if op == "residual":
            width = self.width
            body = nn.Sequential(*self.blocks(args[0]))
            if self.width != width:
                raise ValueError(f"a residual body must keep the width {width}, got {self.width}: {block}")
            return [Residual(body)]
        if op == "concat":
            width = self.width
            left = nn.Sequential(*self.blocks(args[0]))
            left_width, self.width = self.width, width
            right = nn.Sequential(*self.blocks(args[1]))
            self.width += left_width
            return [Concat(left, right)]
        if op == "nested":
            return [nn.Sequential(nn.Sequential(*self.blocks(args[0])))]
        if op in ("flatten", "reshape"):
            self.width *= self.size * self.size
            return [nn.Flatten() if op == "flatten" else Reshape()]
        if op == "gap":
            return [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if op == "embed":
            linear = nn.Linear(self.width, args[0])
            self.width = args[0]
            return [linear]
        if op == "attention":
            return [SelfAttention(self.width, *args)]
        if op == "mean":
            return [MeanOverPositions()]
        raise ValueError(f"unknown block {block!r}")

    def norm_act(self, bn: bool, relu: bool, dims: int) -> list[nn.Module]:
        norm = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(self.width)
        return ([norm] if bn else []) + ([nn.ReLU()] if relu else [])


# -------------------------------------------------------------------------------------------- strategies


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _bools(draw) -> tuple[bool, bool]:
    return draw(st.booleans()), draw(st.booleans())


def _image_block(draw, width: int, depth: int) -> tuple[list, int]:
    """One block on `width` channels at nesting `depth`: (block, output width)."""
    ops = ["conv", "conv", "depthwise"] + (["residual", "concat", "nested"] if depth < 2 else [])
    op = draw(st.sampled_from(ops))
    if op == "conv":
        groups = draw(st.sampled_from(_divisors(width)))
        channels = groups * draw(st.integers(1, max(1, MAX_WIDTH // groups)))
        return ["conv", channels, draw(st.sampled_from([1, 3])), groups, *_bools(draw)], channels
    if op == "depthwise":
        multiplier = draw(st.sampled_from([1, 2] if 2 * width <= MAX_WIDTH else [1]))
        return ["depthwise", multiplier, *_bools(draw)], width * multiplier
    if op == "residual":
        inner, inner_width = _image_blocks(draw, width, depth + 1, 1, 2)
        if inner_width != width:  # close the body with a 1x1 conv back to the block's width
            inner.append(["conv", width, 1, 1, draw(st.booleans()), False])
        return ["residual", inner], width
    if op == "concat":
        left, left_width = _image_blocks(draw, width, depth + 1, 0, 2)
        right, right_width = _image_blocks(draw, width, depth + 1, 1, 2)
        if left_width + right_width > 2 * MAX_WIDTH:
            return ["nested", right], right_width
        return ["concat", left, right], left_width + right_width
    inner, inner_width = _image_blocks(draw, width, depth + 1, 1, 2)
    return ["nested", inner], inner_width


def _image_blocks(draw, width: int, depth: int, least: int, most: int) -> tuple[list, int]:
    blocks = []
    for _ in range(draw(st.integers(least, most))):
        block, width = _image_block(draw, width, depth)
        blocks.append(block)
    return blocks, width


def _vector_block(draw, width: int, depth: int) -> tuple[list, int]:
    op = draw(st.sampled_from(["linear", "linear"] + (["residual", "concat", "nested"] if depth < 2 else [])))
    if op == "linear":
        features = draw(st.integers(1, MAX_WIDTH))
        return ["linear", features, *_bools(draw)], features
    if op == "residual":
        inner, inner_width = _vector_blocks(draw, width, depth + 1, 1, 2)
        if inner_width != width:
            inner.append(["linear", width, draw(st.booleans()), False])
        return ["residual", inner], width
    if op == "concat":
        left, left_width = _vector_blocks(draw, width, depth + 1, 0, 2)
        right, right_width = _vector_blocks(draw, width, depth + 1, 1, 2)
        if left_width + right_width > 2 * MAX_WIDTH:
            return ["nested", right], right_width
        return ["concat", left, right], left_width + right_width
    inner, inner_width = _vector_blocks(draw, width, depth + 1, 1, 2)
    return ["nested", inner], inner_width


def _vector_blocks(draw, width: int, depth: int, least: int, most: int) -> tuple[list, int]:
    blocks = []
    for _ in range(draw(st.integers(least, most))):
        block, width = _vector_block(draw, width, depth)
        blocks.append(block)
    return blocks, width


def _stem(draw, op: str, width: int) -> tuple[list, int]:
    """Mostly a dense first layer, as real networks have (without one, the blocks act on the input itself, whose
    width cannot change, and many small networks would have nothing to prune)."""
    if draw(st.integers(0, 4)) == 0:
        return [], width
    out = draw(st.integers(2, MAX_WIDTH))
    return [[op, out, draw(st.sampled_from([1, 3])), 1, *_bools(draw)] if op == "conv" else
            [op, out, *_bools(draw)]], out


@st.composite
def image_specs(draw) -> dict:
    """Convolutional networks: conv blocks (grouped, depthwise, residual, concatenated, nested), then a bridge
    (flatten, reshape or global pooling) and linear blocks."""
    channels, size = draw(st.integers(1, 4)), draw(st.sampled_from([4, 6, 8]))
    stem, width = _stem(draw, "conv", channels)
    body, width = _image_blocks(draw, width, 0, 1, 3)
    body = stem + body
    flat_size = size
    if draw(st.booleans()):
        body.insert(draw(st.integers(0, len(body))), ["pool"])
        flat_size = size // 2
    bridge = draw(st.sampled_from(["flatten", "reshape", "gap"]))
    if bridge != "gap" and width * flat_size ** 2 > MAX_FLAT:
        bridge = "gap"
    body.append([bridge])
    tail, _ = _vector_blocks(draw, width * flat_size ** 2 if bridge != "gap" else width, 0, 0, 2)
    return {"input": ["image", channels, size], "body": body + tail, "classes": draw(st.integers(2, 4)),
            "seed": draw(st.integers(0, 2 ** 16))}


@st.composite
def vector_specs(draw) -> dict:
    """Multi-layer perceptrons with batch norms, residual additions, concatenations and nesting."""
    features = draw(st.integers(2, 8))
    stem, width = _stem(draw, "linear", features)
    body, _ = _vector_blocks(draw, width, 0, 1, 4)
    body = stem + body
    return {"input": ["vector", features], "body": body, "classes": draw(st.integers(2, 4)),
            "seed": draw(st.integers(0, 2 ** 16))}


@st.composite
def attention_specs(draw) -> dict:
    """A linear embedding, one or two multi-head self-attention layers, a mean over positions, linear blocks."""
    heads = draw(st.sampled_from([1, 2, 4]))
    width = heads * draw(st.integers(1, 3))
    body = [["embed", width]]
    for _ in range(draw(st.integers(1, 2))):
        body.append(["attention", heads, draw(st.booleans())])
    body.append(["mean"])
    tail, _ = _vector_blocks(draw, width, 0, 0, 2)
    return {"input": ["sequence", draw(st.integers(2, 4)), draw(st.integers(2, 6))], "body": body + tail,
            "classes": draw(st.integers(2, 4)), "seed": draw(st.integers(0, 2 ** 16))}
