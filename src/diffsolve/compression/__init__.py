"""Smaller and cheaper models from a frozen one: timestep-aware quantisation (fake and real-kernel backends,
learned rounding, packed checkpoints), LoRA adapters and feature reuse across sampling steps."""
from .api import quantize
from .formats import FORMATS, Format, get_format
from .lora import add_lora, finetune_lora, load_adapter, merge_lora, save_adapter
from .packed import load_packed, save_packed
from .quantize import Calibration, CalibrationSet, QuantizedNet, record_inputs
from .reuse import feature_reuse, flops

__all__ = ["quantize", "Calibration", "CalibrationSet", "record_inputs", "QuantizedNet", "FORMATS", "Format",
           "get_format", "save_packed", "load_packed", "add_lora", "merge_lora", "save_adapter", "load_adapter",
           "finetune_lora", "feature_reuse", "flops"]
