"""Functional normalization with the signatures of ``torch.nn.functional``, on one shared core."""

from .norms import batch_norm, group_norm, instance_norm, layer_norm, rms_norm

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]
