"""Reference models used by the ``qpasses`` tests, examples and benchmarks.

Every model here is a plain :class:`torch.nn.Module` built from standard
``torch.nn`` layers, with no dependency on the rest of ``qpasses``.  All of
them are small enough to run (and, where it makes sense, train) on a CPU in
seconds.  Image models default to one input channel and work on the
8x8 scikit-learn digits images (see :mod:`qpasses.datasets`), but accept any
spatial size thanks to adaptive pooling.

Models
------
* :class:`ResNetLike` -- residual network with BasicBlocks (He et al., 2016).
* :class:`MobileNetV2Like` -- inverted residuals with depthwise convolutions
  and ReLU6 (Sandler et al., 2018).
* :class:`MLP` -- fully connected ReLU network.
* :class:`TransformerEncoderBlock` -- one post-LayerNorm encoder block
  (Vaswani et al., 2017) written in the style of Hugging Face code, so that
  ``torch.fx.symbolic_trace`` cannot trace it while ``torch.export.export``
  can.
* :class:`TransformerClassifier` -- a small stack of the above for
  ``[N, 1, 8, 8]`` images (each image row is one token).
* :class:`DigitsCNN` -- the small BatchNorm CNN that is the project's
  "real-data model" (trained by :func:`qpasses.datasets.train_digits_cnn`).
* :func:`conv_bn_chain` / :func:`chain_for_nodes` -- arbitrarily long residual
  conv-BN-ReLU chains for graph-engine speed benchmarks.

:data:`MODELS` maps short names to constructors and :func:`example_input`
returns a deterministic input tensor for each of them.

References
----------
* K. He, X. Zhang, S. Ren, J. Sun. "Deep Residual Learning for Image
  Recognition." CVPR 2016.
* M. Sandler, A. Howard, M. Zhu, A. Zhmoginov, L.-C. Chen. "MobileNetV2:
  Inverted Residuals and Linear Bottlenecks." CVPR 2018.
* A. Vaswani et al. "Attention Is All You Need." NeurIPS 2017.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "ResNetLike",
    "InvertedResidual",
    "MobileNetV2Like",
    "MLP",
    "TransformerEncoderBlock",
    "TransformerClassifier",
    "DigitsCNN",
    "ConvBNBlock",
    "ConvBNChain",
    "conv_bn_chain",
    "chain_for_nodes",
    "chain_nodes_per_block",
    "MODELS",
    "example_input",
]


# ---------------------------------------------------------------------------
# ResNet (He et al., 2016)
# ---------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet BasicBlock: two 3x3 conv-BN layers plus an identity shortcut.

    ``out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` where the
    shortcut is the identity, or -- when the block changes the stride or the
    channel count -- a 1x1 strided convolution followed by BatchNorm
    ("option B" of He et al., 2016).

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the first 3x3 convolution (1 or 2).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[N, in_ch, H, W]``."""
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu2(out)


class ResNetLike(nn.Module):
    """A small ResNet (He et al., 2016) for low-resolution images.

    Layout: 3x3 conv-BN-ReLU stem, then one stage per entry of ``blocks``.
    Stage ``i`` has ``width * 2**i`` channels and ``blocks[i]`` BasicBlocks;
    every stage after the first starts with a stride-2 block whose shortcut
    is a strided 1x1 conv + BN.  Global average pooling, flatten and a linear
    classifier finish the network.

    Args:
        num_classes: number of output logits.
        in_ch: input channels.
        width: channels of the stem and of the first stage.
        blocks: number of BasicBlocks per stage.

    Input ``[N, in_ch, H, W]`` (any ``H, W >= 1``), output ``[N, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_ch: int = 1,
        width: int = 16,
        blocks: Sequence[int] = (2, 2),
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        stages = []
        ch = width
        for i, n in enumerate(blocks):
            out_ch = width * (2**i)
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(ch, out_ch, stride))
                ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for images ``x`` of shape ``[N, in_ch, H, W]``."""
        x = self.stem(x)
        x = self.stages(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


# ---------------------------------------------------------------------------
# MobileNetV2 (Sandler et al., 2018)
# ---------------------------------------------------------------------------


class InvertedResidual(nn.Module):
    """MobileNetV2 inverted-residual block (Sandler et al., 2018).

    1x1 expansion conv-BN-ReLU6 (to ``in_ch * expand_ratio`` channels),
    3x3 depthwise conv-BN-ReLU6 (``groups`` = channels, carrying the stride),
    and a linear 1x1 projection conv-BN.  The input is added back when the
    stride is 1 and the channel count is unchanged.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: depthwise stride (1 or 2).
        expand_ratio: channel expansion factor ``t``; with 1 the expansion
            convolution is omitted, as in the paper.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, expand_ratio: int = 4) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers = []
        if expand_ratio != 1:
            layers += [
                nn.Conv2d(in_ch, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
            ]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[N, in_ch, H, W]``."""
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Like(nn.Module):
    """A small MobileNetV2 (Sandler et al., 2018).

    Layout: 3x3 conv-BN-ReLU6 stem with ``width`` channels, three inverted
    residual blocks (``width -> width`` stride 1 with a residual add,
    ``width -> 2*width`` stride 2, ``2*width -> 2*width`` stride 1 with a
    residual add; expansion factor 4), a 1x1 conv-BN-ReLU6 head with
    ``4*width`` channels, global average pooling, flatten and a linear
    classifier.

    Args:
        num_classes: number of output logits.
        in_ch: input channels.
        width: base channel count.

    Input ``[N, in_ch, H, W]``, output ``[N, num_classes]``.
    """

    def __init__(self, num_classes: int = 10, in_ch: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU6(),
        )
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, stride=1, expand_ratio=4),
            InvertedResidual(width, 2 * width, stride=2, expand_ratio=4),
            InvertedResidual(2 * width, 2 * width, stride=1, expand_ratio=4),
        )
        self.head = nn.Sequential(
            nn.Conv2d(2 * width, 4 * width, 1, bias=False),
            nn.BatchNorm2d(4 * width),
            nn.ReLU6(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for images ``x`` of shape ``[N, in_ch, H, W]``."""
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))


# ---------------------------------------------------------------------------
# MLP
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected network: flatten, then Linear-ReLU layers, then Linear.

    Args:
        in_features: size of the flattened input (64 for 8x8 digits).
        hidden: widths of the hidden layers.
        num_classes: number of output logits.

    Input ``[N, ...]`` with ``in_features`` elements per sample, output
    ``[N, num_classes]``.
    """

    def __init__(
        self,
        in_features: int = 64,
        hidden: Sequence[int] = (128, 64),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        layers: list = [nn.Flatten(1)]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for ``x`` (flattened from dimension 1)."""
        return self.net(x)


# ---------------------------------------------------------------------------
# Transformer (Vaswani et al., 2017)
# ---------------------------------------------------------------------------


class TransformerEncoderBlock(nn.Module):
    """One post-LayerNorm Transformer encoder block (Vaswani et al., 2017).

    ``h = LayerNorm(x + MHSA(x))`` followed by
    ``out = LayerNorm(h + W2 GELU(W1 h))``.  Multi-head self-attention uses
    separate ``q``/``k``/``v`` :class:`~torch.nn.Linear` projections, explicit
    ``matmul`` and :func:`torch.nn.functional.softmax`, and an output
    projection.

    The forward pass is deliberately written the way much Hugging Face style
    code is, which makes it a test case for graph front-ends:

    * a Python ``if`` on the sequence length (``x.size(1) > self.seq_len``),
      i.e. control flow on a shape -- ``torch.fx.symbolic_trace`` cannot
      convert the comparison proxy to ``bool``;
    * an attention mask built with ``torch.ones(x.shape[0], x.shape[1])`` and
      then modified by item assignment (``mask[:, 0] = 1.0``, "the first
      token is always visible, so no attention row is fully masked") -- fx
      proxies do not support ``__setitem__``.

    Both constructs are fine for ``torch.export.export``: it specialises the
    shape check, and records the item assignment as an in-place
    ``aten.fill_`` on a slice of the freshly created mask (the scalar ``1.0``
    becomes a lifted tensor constant); ``ExportedProgram.run_decompositions()``
    turns that into functional ``copy``/``select_scatter`` form.

    Args:
        d_model: embedding size.
        nhead: number of attention heads (must divide ``d_model``).
        dim_ff: hidden size of the feed-forward network.
        seq_len: maximum supported sequence length (longer inputs raise
            :class:`ValueError`).
        causal: if true, token ``i`` only attends to tokens ``<= i``.

    Input ``[N, T, d_model]`` with ``T <= seq_len`` and an optional
    ``attention_mask`` of shape ``[N, T]`` (1 = keep, 0 = padding); output
    ``[N, T, d_model]``.
    """

    def __init__(
        self,
        d_model: int = 64,
        nhead: int = 4,
        dim_ff: int = 128,
        seq_len: int = 16,
        causal: bool = False,
    ) -> None:
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"d_model={d_model} is not divisible by nhead={nhead}")
        self.d_model = d_model
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.seq_len = seq_len
        self.causal = causal
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, dim_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(dim_ff, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def _attention_bias(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Additive attention bias ``[N, 1, T|1, T]`` built HF-style from a 0/1 mask."""
        if attention_mask is None:
            mask = torch.ones(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
        else:
            mask = attention_mask.to(dtype=x.dtype).clone()
        # The first token is always visible, so that no row is fully masked.
        mask[:, 0] = 1.0
        bias = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
        if self.causal:
            t = x.shape[1]
            future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
            bias = bias.masked_fill(future, torch.finfo(x.dtype).min)
        return bias

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[N, T, d_model]``."""
        if x.size(1) > self.seq_len:
            raise ValueError(f"sequence length {x.size(1)} exceeds seq_len={self.seq_len}")
        n, t, _ = x.shape
        bias = self._attention_bias(x, attention_mask)

        q = self.q_proj(x).view(n, t, self.nhead, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(n, t, self.nhead, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(n, t, self.nhead, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores + bias
        probs = F.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(n, t, self.d_model)
        h = self.norm1(x + self.out_proj(ctx))

        ff = self.fc2(self.act(self.fc1(h)))
        return self.norm2(h + ff)


class TransformerClassifier(nn.Module):
    """Small Transformer image classifier built from :class:`TransformerEncoderBlock`.

    An ``[N, 1, H, W]`` image is read as a sequence of ``H`` tokens of ``W``
    features (one token per row).  Tokens are embedded by a linear layer,
    a learned positional embedding is added, ``num_layers`` encoder blocks
    are applied, the tokens are mean-pooled and a linear layer produces the
    logits.  Like its blocks, it is exportable with ``torch.export`` but not
    traceable with ``torch.fx.symbolic_trace``.

    Args:
        num_classes: number of output logits.
        in_features: features per token (image width; 8 for digits).
        seq_len: number of tokens (image height; 8 for digits).
        d_model: embedding size.
        nhead: attention heads.
        dim_ff: feed-forward hidden size.
        num_layers: number of encoder blocks.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_features: int = 8,
        seq_len: int = 8,
        d_model: int = 32,
        nhead: int = 4,
        dim_ff: int = 64,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.embed = nn.Linear(in_features, d_model)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerEncoderBlock(d_model, nhead, dim_ff, seq_len) for _ in range(num_layers)
        )
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for images ``x`` of shape ``[N, 1, seq_len, in_features]``."""
        tokens = x.reshape(x.shape[0], -1, self.in_features)
        h = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))


# ---------------------------------------------------------------------------
# Digits CNN (the real-data model)
# ---------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """Small BatchNorm CNN for the 8x8 scikit-learn digits.

    Layout (``w = width``)::

        conv3x3(1->w)-BN-ReLU, conv3x3(w->w)-BN-ReLU, maxpool 2x2   # 8x8 -> 4x4
        conv3x3(w->2w)-BN-ReLU, global average pool, flatten, linear(2w->10)

    Trained by :func:`qpasses.datasets.train_digits_cnn` (15 epochs, a few
    seconds on two CPU cores) it reaches 98.5-99.5 % test accuracy,
    depending on the seed (99.4 % with the default seed 0).

    Args:
        width: channels of the first two convolutions.
        num_classes: number of output logits.
        in_ch: input channels.

    Input ``[N, in_ch, 8, 8]``, output ``[N, num_classes]``.
    """

    def __init__(self, width: int = 16, num_classes: int = 10, in_ch: int = 1) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return class logits for images ``x`` of shape ``[N, in_ch, 8, 8]``."""
        return self.fc(self.flatten(self.pool(self.features(x))))


# ---------------------------------------------------------------------------
# Long conv-BN chains for engine benchmarks
# ---------------------------------------------------------------------------


class ConvBNBlock(nn.Module):
    """Residual block ``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``.

    Shape-preserving (3x3 convolutions with padding 1, ``channels`` in and
    out).  Under ``torch.fx.symbolic_trace`` one block contributes seven
    nodes: conv, BN, ReLU, conv, BN, add, ReLU.

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``[N, channels, H, W]``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + x
        return self.relu2(out)


class ConvBNChain(nn.Module):
    """A chain of :class:`ConvBNBlock` held in an :class:`~torch.nn.ModuleList`.

    ``forward`` loops over the blocks; ``torch.fx`` unrolls the loop, so the
    traced graph grows linearly with ``num_blocks`` (see
    :func:`chain_nodes_per_block`).  Construction is linear in
    ``num_blocks`` (about 10k blocks, i.e. ~70k graph nodes, take a few
    seconds).

    Args:
        num_blocks: number of residual blocks (>= 1).
        channels: channels of every convolution; the input is
            ``[N, channels, H, W]``.
    """

    def __init__(self, num_blocks: int, channels: int = 8) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.channels = channels
        self.blocks = nn.ModuleList()
        for _ in range(num_blocks):
            self.blocks.append(ConvBNBlock(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply all blocks in order to ``x`` of shape ``[N, channels, H, W]``."""
        for block in self.blocks:
            x = block(x)
        return x


def conv_bn_chain(num_blocks: int, channels: int = 8) -> ConvBNChain:
    """Build a residual conv-BN-ReLU chain of ``num_blocks`` blocks.

    Each block is ``conv -> BN -> ReLU -> conv -> BN -> (+ identity) -> ReLU``
    (see :class:`ConvBNBlock`).  Intended for graph-engine speed benchmarks;
    use :func:`chain_for_nodes` to size it by graph node count.

    Args:
        num_blocks: number of residual blocks (>= 1).
        channels: channels of every convolution.

    Returns:
        A :class:`ConvBNChain` taking ``[N, channels, H, W]`` inputs.
    """
    return ConvBNChain(num_blocks, channels)


@functools.lru_cache(maxsize=None)
def chain_nodes_per_block(channels: int = 8) -> Tuple[int, int]:
    """Measure the ``torch.fx.symbolic_trace`` size of :func:`conv_bn_chain`.

    Traces chains of one and two blocks and returns
    ``(nodes_per_block, fixed_nodes)`` so that a chain of ``b`` blocks has
    ``fixed_nodes + b * nodes_per_block`` graph nodes (placeholder and output
    included).  With the current definition this is ``(7, 2)``.  The result
    is cached per ``channels``.
    """
    import torch.fx

    n1 = len(torch.fx.symbolic_trace(conv_bn_chain(1, channels)).graph.nodes)
    n2 = len(torch.fx.symbolic_trace(conv_bn_chain(2, channels)).graph.nodes)
    per_block = n2 - n1
    return per_block, n1 - per_block


def chain_for_nodes(target_nodes: int, channels: int = 8) -> ConvBNChain:
    """Build a :func:`conv_bn_chain` whose traced graph has about ``target_nodes`` nodes.

    The block count is ``round((target_nodes - fixed) / per_block)`` (at
    least 1), using the sizes measured by :func:`chain_nodes_per_block`.  The
    resulting ``torch.fx.symbolic_trace`` node count is within
    ``per_block / 2`` (3-4 nodes) of the target for targets above ~10.

    Args:
        target_nodes: desired number of graph nodes (e.g. 100_000).
        channels: channels of every convolution.
    """
    per_block, fixed = chain_nodes_per_block(channels)
    num_blocks = max(1, int(round((target_nodes - fixed) / per_block)))
    return conv_bn_chain(num_blocks, channels)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

#: Short model names mapped to constructors (all callable with no arguments).

class CatNet(nn.Module):
    """Two conv branches concatenated, ReLU6, max-pool, avg-pool, linear.

    Exercises integer concatenation, clamps and pooling; input ``[N, 3, 8, 8]``, output ``[N, 5]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        y = F.relu6(self.c(y))
        y = F.avg_pool2d(F.max_pool2d(y, 2), 2)
        return self.fc(y.flatten(1))


MODELS: Dict[str, Callable[..., nn.Module]] = {
    "resnet": ResNetLike,
    "mobilenetv2": MobileNetV2Like,
    "mlp": MLP,
    "transformer": TransformerEncoderBlock,
    "digits_cnn": DigitsCNN,
}

# Per-sample input shapes for the default constructors.  The extra entries
# (not in MODELS) cover the other models defined in this module.
_INPUT_SHAPES: Dict[str, Tuple[int, ...]] = {
    "resnet": (1, 8, 8),
    "mobilenetv2": (1, 8, 8),
    "mlp": (1, 8, 8),
    "transformer": (16, 64),
    "digits_cnn": (1, 8, 8),
    "transformer_classifier": (1, 8, 8),
    "conv_bn_chain": (8, 8, 8),
}


def example_input(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Return a deterministic random input for the default model called ``name``.

    Images are ``[batch, 1, 8, 8]`` (digits-sized) for ``"resnet"``,
    ``"mobilenetv2"``, ``"mlp"``, ``"digits_cnn"`` and
    ``"transformer_classifier"``; ``"transformer"`` gets
    ``[batch, 16, 64]`` (``[N, seq_len, d_model]``) and ``"conv_bn_chain"``
    gets ``[batch, 8, 8, 8]``.  Values are standard normal, drawn from a
    private generator seeded with ``seed`` (the global RNG is untouched).

    Raises:
        KeyError: for an unknown name.
    """
    if name not in _INPUT_SHAPES:
        raise KeyError(f"unknown model {name!r}; known: {sorted(_INPUT_SHAPES)}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch,) + _INPUT_SHAPES[name], generator=gen)
