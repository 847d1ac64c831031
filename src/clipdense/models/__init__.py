"""Pure ``nn.Module``s: no file or network I/O here."""

from clipdense.models.backbones import AttentionPool, CLIPResNetBackbone, CLIPViTBackbone, TimmBackbone
from clipdense.models.decoders import FPN, FPNHead, UperNetHead
from clipdense.models.ppl import AttributePromptEncoder, PPLSegmentor, ProbabilisticDecoder
from clipdense.models.registry import count_flops, count_parameters, create_model, list_models, register_model
from clipdense.models.segmentors import CLIPFPNSegmentor, DenseCLIPSegmentor
from clipdense.models.text import ContextDecoder, ContextTextEncoder, FrozenCLIPTextEncoder, PreModelPrompter

__all__ = [
    "FPN",
    "AttentionPool",
    "CLIPFPNSegmentor",
    "CLIPResNetBackbone",
    "CLIPViTBackbone",
    "ContextDecoder",
    "ContextTextEncoder",
    "DenseCLIPSegmentor",
    "FPNHead",
    "FrozenCLIPTextEncoder",
    "PreModelPrompter",
    "TimmBackbone",
    "UperNetHead",
    "AttributePromptEncoder",
    "PPLSegmentor",
    "ProbabilisticDecoder",
    "count_flops",
    "count_parameters",
    "create_model",
    "list_models",
    "register_model",
]

from clipdense.models.maskclip_plus import (  # noqa: E402
    ASPPv2,
    DeepLabV3PlusHead,
    DilatedResNetTrunk,
    MaskCLIPGuide,
    MaskCLIPPlus,
    pseudo_labels,
)

__all__ += ["ASPPv2", "DeepLabV3PlusHead", "DilatedResNetTrunk", "MaskCLIPGuide", "MaskCLIPPlus", "pseudo_labels"]

from clipdense.models.detectors import CLIPDetector, GuidedFPN  # noqa: E402
from clipdense.models.guidance import LanguageGuidance  # noqa: E402
from clipdense.models.ppl import PPLGuidance  # noqa: E402

__all__ += ["CLIPDetector", "GuidedFPN", "LanguageGuidance", "PPLGuidance"]
