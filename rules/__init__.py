"""The rewrite rules, in the order the engine applies them within a sweep.

A new rule is one module here, one test module in tests/rules/, and one line in REGISTRY.
"""
from .border_fill import CanonicalizeBorderFill
from .dead_channels import RemoveDeadChannels
from .fold_branch_into_slice import FoldBranchIntoSlice
from .fold_linear_affine import FoldLinearAffine
from .fuse_bn_conv import FuseBnConv
from .fuse_conv_bn import FuseConvBn
from .merge_linear_regions import MergeLinearRegions
from .remove_identities import RemoveIdentities
from .repmlp import FoldConvIntoFc
from .rm_residual import RmResidual

REGISTRY = [
    RemoveIdentities,
    CanonicalizeBorderFill,
    FuseConvBn,
    FuseBnConv,
    MergeLinearRegions,
    FoldConvIntoFc,
    FoldLinearAffine,
    FoldBranchIntoSlice,
    RemoveDeadChannels,
    RmResidual,
]
