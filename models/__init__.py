"""Training-time re-parameterizable PyTorch blocks and networks, and the registry ``ZOO``.

Every entry of ``ZOO`` builds a small, seeded, calibrated (``models.common.calibrate``) model in
eval mode, names its input shape, and states the op-type histogram its ONNX export must reach once
``onnxrep optimize`` has fully re-parameterized it (``deploy_ops``).

deploy_ops convention
---------------------
``deploy_ops`` is the EXACT op-type histogram of the deploy graph, written with canonical names.
Before comparing, an exported/optimized graph's histogram is normalized with ``OP_ALIASES``:
the dynamo exporter writes ``GlobalAveragePool`` as ``ReduceMean`` and ``Flatten`` as ``Reshape``,
so those are counted under the legacy names.  After that, every op type must match its count
exactly, and every op type not listed must be absent (no ``BatchNormalization``, ``Identity``,
``Add``, ``Pad``, ``Constant``... unless listed).  ``check_deploy_ops`` implements this and returns
a list of human-readable problems (empty = pass).

``build_deploy()`` gives the hand-written deploy form of the same weights: every block's own
``switch_to_deploy()`` (the paper's conversion, see ``models.deploy``), applied to a copy.

Some entries also fix the output-channel count of each deploy ``Conv`` in node order
(``deploy_conv_out_channels``, e.g. ResRep's pruned conv) and alternative deploy histograms for
opt-in transforms (``extra_deploy_ops``, e.g. ``{"rm": {...}}`` for ResNet -> plain).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Mapping

import torch
from torch import nn

from .acnet import ACBlock
from .common import calibrate
from .dbb import DiverseBranchBlock
from .detectors import QARepVGGNet, RepC3, RepConvNet, RepNCSPELAN4
from .ecb import ECBNet
from .expandnet import ExpandNetCL
from .deploy import convert as to_deploy
from .fastvit import FastViTStage, RepMixer
from .mobileone import MobileOneNet, MobileOneSENet
from .orepa import OREPANet
from .pplcnet import LCNetV3Pair
from .repghost import RepGhostModule
from .replknet import ReparamLargeKernelConv, RepLKBlock
from .repvgg import RepVGG
from .repvit import RepViTBlockNet, RepViTNet
from .resnet import resnet18, resnet50
from .repmlp import RepMLPBlock
from .resrep import ResRepBlock
from .split_concat import SplitConvConcat
from .transformers import (ConvNeXtBlock, LeViTBlock, LoRAAttention, LoRAInplaceAttention, LoRAMergedAttention, LoRAMLP,
                           LoRAQKVAttention, MixerBlock, ViTLayerScaleBlock)

__all__ = [
    "ZOO",
    "ZooEntry",
    "OP_ALIASES",
    "op_histogram",
    "normalize_histogram",
    "check_deploy_ops",
    "conv_out_channels",
    "calibrate",
    "to_deploy",
]

#: exporter-specific spellings of the same deploy op, mapped to the canonical (legacy) name.
OP_ALIASES: Mapping[str, str] = {"ReduceMean": "GlobalAveragePool", "Reshape": "Flatten"}


def _load(model) -> "onnx.ModelProto":  # noqa: F821
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return onnx.load(str(model), load_external_data=False)
    return model


def op_histogram(model) -> Counter:
    """Op-type histogram of the main graph of an ``onnx.ModelProto`` (or a path to one)."""
    return Counter(n.op_type for n in _load(model).graph.node)


def normalize_histogram(histogram: Mapping[str, int]) -> Counter:
    """Merge exporter-specific aliases (``OP_ALIASES``) into the canonical op names."""
    out: Counter = Counter()
    for op, n in histogram.items():
        out[OP_ALIASES.get(op, op)] += n
    return out


def check_deploy_ops(expected: Mapping[str, int], histogram: Mapping[str, int]) -> list[str]:
    """Compare a graph's op histogram with ``expected`` deploy ops; return the problems found.

    Both sides are normalized with ``OP_ALIASES``; op types must match exactly and op types not in
    ``expected`` must be absent.
    """
    want, got = normalize_histogram(expected), normalize_histogram(histogram)
    problems = []
    for op in sorted(set(want) | set(got)):
        w, g = want.get(op, 0), got.get(op, 0)
        if w != g:
            if w == 0:
                problems.append(f"{op}: {g} present, none expected")
            else:
                problems.append(f"{op}: expected {w}, found {g}")
    return problems


def conv_out_channels(model) -> list[int]:
    """Output channels of each ``Conv`` node, in node order (from the weight initializer's dims)."""
    m = _load(model)
    dims = {t.name: list(t.dims) for t in m.graph.initializer}
    return [dims[n.input[1]][0] if n.input[1] in dims else -1
            for n in m.graph.node if n.op_type == "Conv"]


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo.

    Attributes:
        name: registry key.
        build: returns the calibrated model in eval mode (seeded: same weights every call).
        input_shape: the input the model is exported and verified with (batch 1).
        deploy_ops: exact op histogram of the fully re-parameterized graph (module docstring).
        description: one line.
        notes: what the deploy structure is and why.
        deploy_conv_out_channels: output channels of each deploy Conv in node order, where fixed by
            the math (None: not checked).
        extra_deploy_ops: deploy histograms under opt-in transforms, keyed by transform name.
    """

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    deploy_ops: Mapping[str, int]
    description: str
    notes: str
    deploy_conv_out_channels: tuple[int, ...] | None = None
    extra_deploy_ops: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def build_deploy(self) -> nn.Module:
        """The hand-written deploy form: ``build()`` converted by the blocks' own
        ``switch_to_deploy`` methods (``models.deploy.convert``), in eval mode."""
        return to_deploy(self.build())

    def example_input(self, seed: int = 0, batch: int | None = None) -> torch.Tensor:
        """A seeded N(0, 1) input of ``input_shape`` (batch overridable)."""
        shape = self.input_shape if batch is None else (batch, *self.input_shape[1:])
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def check_deploy_ops(self, histogram: Mapping[str, int], transform: str | None = None
                         ) -> list[str]:
        """Problems of ``histogram`` against ``deploy_ops`` (or ``extra_deploy_ops[transform]``)."""
        expected = self.deploy_ops if transform is None else self.extra_deploy_ops[transform]
        return check_deploy_ops(expected, histogram)

    def check_deploy_model(self, model, transform: str | None = None) -> list[str]:
        """Problems of a deploy ONNX model (proto or path): op histogram and Conv channel counts."""
        m = _load(model)
        problems = self.check_deploy_ops(op_histogram(m), transform)
        if transform is None and self.deploy_conv_out_channels is not None:
            got = tuple(conv_out_channels(m))
            if got != tuple(self.deploy_conv_out_channels):
                problems.append(f"Conv output channels: expected "
                                f"{tuple(self.deploy_conv_out_channels)}, found {got}")
        return problems


def _build(factory: Callable[[], nn.Module], input_shape: tuple[int, ...], seed: int = 0
           ) -> nn.Module:
    torch.manual_seed(seed)
    model = factory()
    return calibrate(model, input_shape, seed=seed)


_HEAD = {"GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}

ZOO: dict[str, ZooEntry] = {}


def _register(name, factory, input_shape, deploy_ops, description, notes, **kw) -> None:
    input_shape = tuple(input_shape)
    ZOO[name] = ZooEntry(name=name, build=partial(_build, factory, input_shape),
                         input_shape=input_shape, deploy_ops=dict(deploy_ops),
                         description=description, notes=notes, **kw)


_register(
    "repvgg", RepVGG, (1, 3, 32, 32), {"Conv": 6, "Relu": 6, **_HEAD},
    "RepVGG net: stride-2 stem, 2 stages, 6 blocks (2 grouped g=4, 3 with identity BN), GAP, FC",
    "Each RepVGG block (3x3 conv-BN + 1x1 conv-BN [+ identity BN] -> ReLU) becomes one 3x3 Conv "
    "+ Relu; the identity kernel of the grouped block is per group; stride-2 blocks keep their "
    "1x1 branch (embedded at the centre).  Head GlobalAveragePool/Flatten/Gemm unchanged.")
_register(
    "acnet", ACBlock, (1, 8, 16, 16), {"Conv": 1},
    "ACNet asymmetric conv block: 3x3 + 1x3 + 3x1 conv-BN branches summed (8->16)",
    "Fold each BN, embed the 1x3/3x1 kernels in the centre row/column of the 3x3, add: one Conv.")
for _mode in ("slice", "subpadadd"):
    _register(
        f"dbb_{_mode}", partial(DiverseBranchBlock, 8, 16, pad_mode=_mode), (1, 8, 16, 16),
        {"Conv": 1},
        f"Diverse Branch Block, 4 branches, BN-and-pad border fill written as '{_mode}' (8->16)",
        "KxK-BN, 1x1-BN, 1x1->BNAndPad->AvgPool(pad 0)->BN and 1x1->BNAndPad->KxK(pad 0)->BN all "
        "become padded KxK convs of the input (BN-and-pad makes the border exact) and add: one "
        "Conv.  The fill value is derived from BN constants; in legacy-nofold it is a Sub/Mul/Div/"
        "Sqrt subgraph over initializers that must be constant-folded first.")
_register(
    "mobileone", MobileOneNet, (1, 16, 16, 16), {"Conv": 4, "Relu": 4},
    "MobileOne: 2 units of (depthwise 3x3 block, pointwise 1x1 block), k=3 conv branches",
    "Each block (k conv-BN branches + 1x1 scale conv-BN + identity BN, summed, ReLU) becomes one "
    "Conv + Relu: dw 3x3 (with identity, stride 1), pw 16->32 (no identity: exports Add(t, 0)), "
    "dw 3x3 stride 2 (no identity), pw 32->32 (with identity).")
_register(
    "repghost", RepGhostModule, (1, 16, 16, 16), {"Conv": 2, "Relu": 2},
    "RepGhost module: 1x1 conv-BN-ReLU, then depthwise 3x3 conv-BN + fusion-BN branch, ReLU",
    "The fusion BN is an identity branch of the depthwise conv: it merges into it.  The primary "
    "1x1's ReLU output feeds both branches (fan-out is fine: both branches are merged).")
_register(
    "replknet_lk", ReparamLargeKernelConv, (1, 16, 16, 16), {"Conv": 1},
    "RepLKNet large kernel: depthwise 13x13 conv-BN + depthwise 5x5 conv-BN in parallel",
    "Fold BNs, zero-pad the 5x5 kernel to 13x13 (offset 4), add: one depthwise 13x13 Conv.")
_register(
    "replknet", RepLKBlock, (1, 16, 16, 16), {"Conv": 3, "Relu": 2, "Add": 1},
    "RepLKNet block: pre-BN, 1x1 conv-BN-ReLU, dw 13x13+5x5 conv-BN, ReLU, 1x1 conv-BN, residual",
    "The pre-BN folds forward into the unpadded 1x1 pw1 (BN before a conv); the large kernel "
    "merges to one dw 13x13 Conv; pw2 absorbs its BN; the residual Add stays.")
_register(
    "expandnet", ExpandNetCL, (1, 8, 16, 16), {"Conv": 2, "Relu": 2},
    "ExpandNet-CL: two 3x3 convs each expanded to 1x1(no bias)->3x3(pad 1)->1x1 (r=4), ReLU",
    "Each linear chain composes to one 3x3 Conv (the padded 3x3 follows a bias-free 1x1, so the "
    "composition is exact at the border); the second has stride 2.")
_register(
    "fastvit", RepMixer, (1, 16, 16, 16), {"Conv": 1},
    "FastViT RepMixer: x + layer_scale * (dwconv-BN(x) + BN(x) - BN(x)), layer scale perturbed",
    "Identity, the two BN-only branches and the dw conv-BN are all dw 3x3 kernels; the layer "
    "scale scales output channels: one depthwise Conv.")
_register(
    "repvit", RepViTNet, (1, 16, 16, 16),
    {"Conv": 3, "Relu": 1, "Add": 1, **_HEAD},
    "RepViT: RepVggDw token mixer, channel-mixer residual, GAP, BN1d+Linear distillation head",
    "RepVggDw (BN(dw3x3-BN + dw1x1 + x)) -> one depthwise Conv; channel mixer -> 2 Conv + Relu + "
    "residual Add; head (two BN1d+Linear averaged) -> one Gemm.")
_register(
    "resnet18", partial(resnet18, width=16), (1, 3, 64, 64),
    {"Conv": 20, "Relu": 17, "Add": 8, "MaxPool": 1, **_HEAD},
    "ResNet-18 (BasicBlock [2,2,2,2], width 16) on 64x64",
    "Plain form: every conv absorbs its BN; residual Adds, MaxPool, head stay.  extra_deploy_ops"
    "['rm']: RM (ResNet->plain, opt-in) removes every Add: 17 Conv, 17 Relu.",
    extra_deploy_ops={"rm": {"Conv": 17, "Relu": 17, "MaxPool": 1, **_HEAD}})
_register(
    "resnet50", partial(resnet50, width=8), (1, 3, 64, 64),
    {"Conv": 53, "Relu": 49, "Add": 16, "MaxPool": 1, **_HEAD},
    "ResNet-50 (Bottleneck [3,4,6,3], width 8, stride on the 3x3) on 64x64",
    "Plain form: every conv absorbs its BN; residual Adds, MaxPool, head stay.  extra_deploy_ops"
    "['rm']: RM removes every Add: 49 Conv, 49 Relu (MACs grow ~10x).",
    extra_deploy_ops={"rm": {"Conv": 49, "Relu": 49, "MaxPool": 1, **_HEAD}})
_register(
    "resrep", ResRepBlock, (1, 8, 16, 16), {"Conv": 2, "Relu": 1},
    "ResRep: 3x3 conv-BN -> 1x1 compactor with 4 of 16 rows exactly zero -> ReLU -> 3x3 conv-BN",
    "conv-BN-compactor merges to one 3x3 Conv whose 4 zero output channels (weights and bias "
    "exactly 0) are dropped with the matching input channels of the following conv: Conv 8->12, "
    "Relu, Conv 12->16.",
    deploy_conv_out_channels=(12, 16))
_register(
    "split_concat", SplitConvConcat, (1, 16, 16, 16), {"Conv": 1},
    "chunk(x, 4) -> 3x3 conv-BN per chunk -> concat (16->32)",
    "Per-chunk kernels stacked along the output axis are one grouped Conv (group 4).")
_register(
    "repmlp", RepMLPBlock, (1, 8, 8, 8), {"Flatten": 2, "Gemm": 1, "Relu": 1},
    "RepMLP block: Linear(C*h*w -> O*h*w)+BN1d on the flattened 8x8 map + 1x1 and 3x3 conv-BN "
    "branches (g=2), summed, ReLU (8->8)",
    "BN1d folds into the Gemm, the conv-BN branches merge into one 3x3 Conv, and that Conv, on "
    "the fixed 8x8 map, is a matrix added to the FC weight (bias repeated per position): "
    "Flatten -> Gemm -> Reshape -> Relu.  The output Reshape counts as Flatten (OP_ALIASES); "
    "dynamo writes the input Flatten as Reshape too.")
_register(
    "fastvit_stage", FastViTStage, (1, 32, 28, 28),
    {"Conv": 8, "Div": 2, "Erf": 2, "Add": 4, "Mul": 4},
    "FastViT stage: 2 RepMixerBlocks (RepMixer k=3, ConvFFN dw7x7-BN -> 1x1 -> GELU -> 1x1, "
    "layer-scaled residual), 32 channels, 28x28",
    "Each RepMixer -> one depthwise 3x3 Conv; the ConvFFN's dw 7x7 absorbs its BN and its layer "
    "scale folds into fc2; the GELU (Div, Erf, Add, Mul, Mul) stays whole so that runtimes fuse "
    "it into one Gelu kernel; the residual Add stays.")
_register(
    "repvit_block", RepViTBlockNet, (1, 32, 14, 14),
    {"Conv": 5, "Relu": 1, "Sigmoid": 1, "Mul": 3, "Div": 1, "Erf": 1, "Add": 2,
     "GlobalAveragePool": 2, "Flatten": 1, "Gemm": 1},
    "RepViT block: RepVggDw + SE token mixer, GELU channel-mixer residual, GAP, BN1d+Linear "
    "distillation head, 32 channels, 14x14",
    "RepVggDw -> one depthwise Conv; the SE (ReduceMean over H, W -- counted as "
    "GlobalAveragePool, OP_ALIASES --, 1x1, ReLU, 1x1, Sigmoid, Mul) stays; "
    "the channel mixer -> Conv, GELU (kept whole), Conv, residual Add; the head -> one Gemm.")
_register(
    "mobileone_se", MobileOneSENet, (1, 32, 16, 16),
    {"Conv": 6, "AveragePool": 2, "Relu": 4, "Sigmoid": 2, "Mul": 2, "Flatten": 2},
    "MobileOne unit with squeeze-excite: dw 3x3 block (with identity) and pw 32->64 block, k=3, "
    "SE (avg pool, 1x1, ReLU, 1x1, sigmoid, multiply) on each",
    "Each block's branches -> one Conv; its SE stays: AveragePool, Conv, Relu, Conv, Sigmoid, "
    "Reshape (MobileOne's view(-1, c, 1, 1), counted as Flatten), Mul, then the block's Relu.")

# -- transformer blocks: linear structure around MatMul on channel-last tokens (models/transformers.py)
# Reshape is counted as Flatten (OP_ALIASES). Each block turns its [1, 16, H, W] input into tokens
# with one Reshape (Flatten) + Transpose; attention heads are split by a Reshape + Transpose each
# for q, k, v and merged back by one Transpose + Reshape.
# The q·kᵀ scale (a scalar Mul on the scores) folds into q's projection (rule fold_attention_scale).
_ATTN = {"Flatten": 5, "Transpose": 5, "Softmax": 1}  # tokens, heads, softmax
_GELU = {"Div": 1, "Erf": 1}  # plus one Add and two Mul, counted per entry
_register(
    "levit", LeViTBlock, (1, 16, 4, 4),
    {**_ATTN, "MatMul": 8, "Add": 8, "HardSwish": 2},
    "LeViT block on 16 tokens: attention and MLP residuals, every Linear followed by BatchNorm1d "
    "on the tokens flattened to [B*N, C]",
    "Each Linear_BN (MatMul -> Flatten/Reshape -> BatchNormalization -> Reshape) becomes one MatMul "
    "+ bias Add (LeViT's Linear_BN.fuse): 6 Linears, no BN and no Flatten/Reshape pair left; "
    "attention's own MatMuls (q.kT, attn.v), head Reshape/Transposes, Softmax, HardSwish and the two "
    "residual Adds stay.")
_register(
    "vit_layerscale", ViTLayerScaleBlock, (1, 16, 4, 4),
    {**_ATTN, **_GELU, "Mul": 2, "MatMul": 8, "Add": 9, "LayerNormalization": 2},
    "Pre-norm ViT block (CaiT / DeiT-III) with layer scale on both residual branches, 16 tokens",
    "x + ls1*proj(attn(norm1(x))), x + ls2*fc2(gelu(fc1(norm2(x)))): each layer scale folds into "
    "the Linear before it (weight columns and bias); no per-channel Mul is left, and the q.kT scale "
    "folds into q's projection. Mul 2 = GELU's two; Add 9 = 6 Linear biases, GELU's +1, 2 residuals.")
_register(
    "convnext", ConvNeXtBlock, (1, 16, 8, 8),
    {**_GELU, "Conv": 1, "Transpose": 2, "LayerNormalization": 1, "MatMul": 2, "Add": 4, "Mul": 2},
    "ConvNeXt block: dw 7x7, channels-last LayerNorm, Linear(4C), GELU, Linear(C), gamma, residual",
    "gamma folds into pwconv2 (weight columns and bias): no per-channel Mul is left; Mul 2 and one "
    "Add are GELU's, the others are the two Linear biases and the residual. The permutes stay.")
_register(
    "lora_mlp", LoRAMLP, (1, 16, 4, 4),
    {**_GELU, "Flatten": 1, "Transpose": 1, "MatMul": 2, "Add": 3, "Mul": 2},
    "Transformer MLP (16->32->16, GELU) with unmerged LoRA adapters: rank 4 on fc1, rank 8 on fc2",
    "Each x.W + b + s.(x.A).B merges into x.(W + s.A.B) + b (loralib's merge): 2 MatMul, as many "
    "as the MLP without adapters.")
_register(
    "lora_attention", LoRAAttention, (1, 16, 4, 4),
    {**_ATTN, "MatMul": 6, "Add": 4},
    "Self-attention (2 heads, 16 tokens) with LoRA on q (rank 4) and v (rank 8)",
    "The q and v adapters merge into their projections: q, k, v, proj + the two attention MatMuls "
    "= 6 MatMul, as many as without adapters.")
_register(
    "lora_qkv", LoRAQKVAttention, (1, 16, 4, 4),
    {**_ATTN, "MatMul": 4, "Add": 2, "Split": 1},
    "Self-attention with one fused qkv Linear split into q, k, v, LoRA on the q (rank 4) and v "
    "(rank 8) slices",
    "Each adapter merges into its columns of the qkv weight (loralib's MergedLinear merge; rule "
    "fold_branch_into_slice): qkv, q.kT, attn.v, proj = 4 MatMul, as without adapters; the Split "
    "stays.")

# -- detector blocks (models/detectors.py)
# SiLU is written out as Sigmoid -> Mul by every exporter form at opsets 17 and 18 (ONNX has no
# SiLU op there); onnxrep keeps the pair whole (onnxrep.patterns) so runtimes fuse it.
_SILU = lambda n: {"Sigmoid": n, "Mul": n}  # noqa: E731
_register(
    "yolov7_repconv", RepConvNet, (1, 16, 16, 16), {"Conv": 3, **_SILU(3)},
    "YOLOv7 RepConv chain (BN eps 1e-3): 16->32 stride 2 (no identity), 32->32 with identity BN, "
    "32->32 groups 4 with identity BN; SiLU",
    "Each RepConv (3x3 conv-BN + 1x1 conv-BN [+ identity BN]) becomes one 3x3 Conv + SiLU "
    "(Sigmoid, Mul); the grouped block's identity kernel is per group (not YOLOv7's "
    "fill_diagonal_).")
_register(
    "yolov6_repblock", partial(RepConvNet, 16, ((32, 1, 1), (32, 1, 1), (32, 1, 1)), "relu"),
    (1, 16, 16, 16), {"Conv": 3, "Relu": 3},
    "YOLOv6 RepBlock: three RepVGGBlocks 16->32->32->32 (the first without identity), ReLU, "
    "BN eps 1e-3",
    "Each RepVGGBlock becomes one 3x3 Conv + Relu (YOLOv6's switch_to_deploy).")
_register(
    "qarepvgg", QARepVGGNet, (1, 16, 16, 16), {"Conv": 2, "Relu": 2},
    "QARepVGG (YOLOv6 v3): 3x3 conv-BN + bias-free 1x1 conv [+ identity], summed, then BN, ReLU; "
    "16->32 stride 2, 32->32",
    "The branch sum is one 3x3 Conv and the BN after the sum scales its output channels: one "
    "Conv + Relu per block.")
_register(
    "yolov9_repncspelan", partial(RepNCSPELAN4, split=True), (1, 16, 16, 16),
    {"Conv": 14, **_SILU(14), "Add": 2, "Concat": 3, "Split": 1},
    "YOLOv9 RepNCSPELAN4(16, 16, 16, 8, 1) (forward_split): cv1, split in two, two RepNCSP "
    "(RepNBottleneck with RepConvN) + Conv3x3 stages, concat, cv4; SiLU, BN eps 1e-3",
    "Every RepConvN (3x3 + 1x1 conv-BN) becomes one 3x3 Conv, every Conv absorbs its BN: 14 "
    "Conv + SiLU (cv1, per stage RepNCSP's cv1/cv2/cv3, RepConvN, bottleneck Conv3x3, the "
    "stage's Conv3x3, and cv4).  The Split, the 2 RepNCSP concats, the ELAN concat and the 2 "
    "bottleneck residual Adds stay.  YOLOv9's default forward (chunk) is the same graph except "
    "that the legacy exporter writes the chunk as 2 Slice instead of 1 Split (onnxrep keeps the "
    "Slices; tests/test_detectors.py checks that form).")
_register(
    "repc3", RepC3, (1, 16, 16, 16), {"Conv": 5, **_SILU(5), "Add": 1},
    "RT-DETR RepC3 (CSPRepLayer) 16->16, e=1: cv1, cv2 1x1 conv-BN-SiLU, 3 RepVggBlocks on cv1's "
    "path, add, cv3 identity",
    "Each RepVggBlock (3x3 + 1x1 conv-BN, SiLU) becomes one 3x3 Conv + SiLU; cv1/cv2 absorb "
    "their BN; the add of the two paths stays.")
_register(
    "repc3_cv3", partial(RepC3, 16, 16, 3, 0.5), (1, 16, 16, 16), {"Conv": 6, **_SILU(6), "Add": 1},
    "RT-DETR RepC3 16->16, e=0.5 (hidden 8): as repc3 with cv3 a 1x1 conv-BN-SiLU 8->16",
    "As repc3, plus cv3: one 1x1 Conv + SiLU after the add (the add of two SiLU outputs cannot "
    "fold into it).")
# -- PP-LCNetV3, OREPA, ECB (models/pplcnet.py, models/orepa.py, models/ecb.py)
_register(
    "pplcnet", LCNetV3Pair, (1, 16, 16, 16), {"Conv": 3, "HardSwish": 2},
    "PP-LCNetV3 pair: depthwise 3x3 and pointwise 1x1 LearnableRepLayers (4 conv branches + 1x1 + "
    "identity BN, scalar affine, HardSwish, scalar affine), 16 channels",
    "Each layer's branches + the scalar affine after their sum -> one Conv (dw 3x3 g=16, pw 1x1); "
    "the dw layer's post-HardSwish scalar affine folds forward into the unpadded pw Conv; the pw "
    "layer's trailing one (Mul, Add) becomes a depthwise 1x1 Conv (the cost model rates one "
    "per-channel conv below two elementwise ops).  PaddleClas's own deploy (build_deploy) keeps all "
    "four affines: Conv 2, HardSwish 2, Mul 4, Add 4.",
    deploy_conv_out_channels=(16, 16, 16))
_register(
    "pplcnet_s2", partial(LCNetV3Pair, 16, 32, stride=2), (1, 16, 16, 16), {"Conv": 3, "HardSwish": 1},
    "PP-LCNetV3 downsampling pair: depthwise 3x3 stride-2 LearnableRepLayer (no identity, no "
    "activation: LCNetV3 skips it at stride 2) then pointwise 1x1 16->32",
    "dw branches + scalar affine -> one dw 3x3 s2 Conv; that Conv is not composed with the pw 1x1 "
    "(a dense 3x3 s2 would cost 6x the MACs+elements: declined with the figures); pw -> one Conv "
    "+ HardSwish; its trailing scalar affine -> a depthwise 1x1 Conv.  PaddleClas's deploy: Conv 2, "
    "HardSwish 1, Mul 3, Add 3.",
    deploy_conv_out_channels=(16, 32, 32))
_register(
    "orepa", OREPANet, (1, 8, 16, 16), {"Conv": 2, "Relu": 2},
    "OREPA: two blocks (8->16, 16->16 stride 2) whose 3x3 kernel is computed in forward from six "
    "branches scaled per output channel, one conv, trailing BN, ReLU",
    "The kernel computation (Einsum, Gather, Pad, Add, Reshape over initializers; folded to one "
    "initializer by the legacy exporter's folding) is constant-folded, the trailing BN folds into "
    "the conv: one Conv + Relu per block, as OREPA's own conversion.")
_register(
    "ecb", ECBNet, (1, 4, 16, 16), {"Conv": 2, "PRelu": 2},
    "ECBSR's edge-oriented blocks: 3x3 + 1x1->3x3 + 1x1->Sobel-x/Sobel-y/Laplacian (depthwise, "
    "scale * fixed mask) with the bias-filled border by slice assignment, PReLU (4->8, 8->8 with "
    "identity)",
    "Each slice-assigned border (Pad + 4 ScatterND writing the 1x1's bias) is the border a padded "
    "1x1 would produce, so every sequential branch is one padded 3x3 conv of the input; with the "
    "3x3 and the identity: one 3x3 Conv + PRelu per block (ECBSR's rep_params).  Dynamic axes: "
    "the same gap as dbb_slice (tests/test_zoo.py KNOWN_GAPS).")
_register(
    "lora_merged", LoRAMergedAttention, (1, 16, 4, 4),
    {**_ATTN, "MatMul": 4, "Add": 2, "Split": 1},
    "Self-attention whose fused qkv Linear is loralib's MergedLinear, unmerged: one A for q and v "
    "(rank 4), B as a grouped conv1d, the adapter output zero-padded to 3C by index assignment "
    "(ScatterND) and added to the qkv output",
    "A, the conv1d between its Transpose pair, the ScatterND placement into zeros and the scale are "
    "one matrix of x, added to the qkv Linear's: one MatMul (rule fold_linear_affine), as loralib's "
    "merge writes it; qkv, q.kT, attn.v, proj = 4 MatMul; the Split stays.")
_register(
    "lora_inplace", LoRAInplaceAttention, (1, 16, 4, 4),
    {**_ATTN, "MatMul": 4, "Add": 2, "Split": 1},
    "Self-attention whose fused qkv output gets its q (rank 4) and v (rank 8) adapters added IN PLACE "
    "before the split: r = qkv(x); r[..., :C] += s.B(A(x)); r[..., 2C:] += s.B(A(x))",
    "Each += (Slice, Add, ScatterND back into r; legacy writes two ScatterNDs per +=, dynamo a "
    "slice_scatter between Transposes) merges into its columns of the qkv weight and the scatters "
    "of r's own columns into themselves vanish (rule fold_branch_into_slice): qkv, q.kT, attn.v, "
    "proj = 4 MatMul, as without adapters; the Split stays.")
_register(
    "mlp_mixer", MixerBlock, (1, 16, 4, 4),
    {**_GELU, "Div": 2, "Erf": 2, "Flatten": 1, "Transpose": 1, "LayerNormalization": 2, "MatMul": 4, "Add": 8,
     "Mul": 5},
    "MLP-Mixer block on 16 tokens: LayerNorm, token-mixing MLP written W.X (constant on the left) with "
    "BatchNorm1d over its output tokens, GELU, channel MLP, layer scale on both residual branches",
    "The token BN folds into the second token-mixing MatMul's rows and bias (the token axis is the "
    "channel axis of W.X); the channel branch's layer scale into its second Linear. Left: 4 MatMul + "
    "4 bias Adds, two GELUs (Div, Erf, Add, 2 Mul each), the token branch's per-channel layer scale "
    "(Mul: it scales columns of a row-mixing product), 2 residual Adds, 2 LayerNormalization.")
