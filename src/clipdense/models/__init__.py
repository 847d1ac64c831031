"""Pure ``nn.Module``s of DenseCLIP (Rao et al., CVPR 2022), PPL, MaskCLIP+ and their detectors: no file or
network I/O here.

Each family builds and registers itself (``@register_model``) in its own module: ``segmentors.py``
(DenseCLIP, CLIP + FPN), ``ppl.py``, ``maskclip_plus.py``, ``detectors.py`` and ``fewshot.py`` (CoOp,
PLOT). Importing this package imports them all, so :func:`create_model` and :func:`list_models` see every
registered name.
``adapters.py`` holds the cache adapters (Tip-Adapter, PLOT-Adapter). ``flops.py`` counts parameters and FLOPs as
the papers' tables do.
"""

# Importing the family modules (segmentors, ppl, maskclip_plus, detectors) registers their models.
from clipdense.models.adapters import PLOTAdapter, TipAdapter
from clipdense.models.backbones import AttentionPool, CLIPResNetBackbone, CLIPViTBackbone, TimmBackbone
from clipdense.models.decoders import FPN, FPNHead, UperNetHead
from clipdense.models.detectors import CLIPDetector, GuidedFPN
from clipdense.models.fewshot import PLOT, CoCoOp, CoOp, PromptLearner
from clipdense.models.flops import count_flops, count_parameters
from clipdense.models.guidance import LanguageGuidance
from clipdense.models.maskclip_plus import (
    ASPPv2,
    DeepLabV3PlusHead,
    DilatedResNetTrunk,
    MaskCLIPGuide,
    MaskCLIPPlus,
    pseudo_labels,
)
from clipdense.models.ppl import AttributePromptEncoder, PPLGuidance, PPLSegmentor, ProbabilisticDecoder
from clipdense.models.registry import create_model, list_models, register_model
from clipdense.models.segmentors import CLIPFPNSegmentor, DenseCLIPSegmentor
from clipdense.models.text import ContextDecoder, ContextTextEncoder, FrozenCLIPTextEncoder, PreModelPrompter

__all__ = [
    "FPN",
    "ASPPv2",
    "AttentionPool",
    "AttributePromptEncoder",
    "CLIPDetector",
    "CLIPFPNSegmentor",
    "CLIPResNetBackbone",
    "CoCoOp",
    "CoOp",
    "CLIPViTBackbone",
    "ContextDecoder",
    "ContextTextEncoder",
    "DeepLabV3PlusHead",
    "DenseCLIPSegmentor",
    "DilatedResNetTrunk",
    "FPNHead",
    "FrozenCLIPTextEncoder",
    "GuidedFPN",
    "LanguageGuidance",
    "PLOT",
    "PLOTAdapter",
    "MaskCLIPGuide",
    "MaskCLIPPlus",
    "PPLGuidance",
    "PPLSegmentor",
    "PreModelPrompter",
    "PromptLearner",
    "ProbabilisticDecoder",
    "TimmBackbone",
    "TipAdapter",
    "UperNetHead",
    "count_flops",
    "count_parameters",
    "create_model",
    "list_models",
    "pseudo_labels",
    "register_model",
]
