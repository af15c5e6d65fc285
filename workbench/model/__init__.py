"""Reference MODE-SSM style CTC + RNN-T hybrid in plain torch (modessm.md section 1)."""

from workbench.model.config import PRESETS, ModelConfig, get_config
from workbench.model.heads import CTCHead, ModeHead
from workbench.model.hybrid import HybridModel, count_parameters
from workbench.model.preprocessor import Preprocessor
from workbench.model.rnnt import Joint, Predictor, RNNTDecoder
from workbench.model.ssm import BidirectionalLayer, Encoder, MambaBlock, SelectiveSSM, reverse_padded, selective_scan

__all__ = [
    "PRESETS", "ModelConfig", "get_config",
    "HybridModel", "count_parameters",
    "Preprocessor", "Encoder", "BidirectionalLayer", "MambaBlock", "SelectiveSSM", "selective_scan",
    "reverse_padded", "CTCHead", "ModeHead", "Predictor", "Joint", "RNNTDecoder",
]
