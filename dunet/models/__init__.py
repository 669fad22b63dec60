"""Networks: the VGG19 encoder and DoubleU-Net."""

from dunet.models.doubleunet import DoubleUNet, DoubleUNetOutputs
from dunet.models.vgg19 import VGG19Encoder, load_imagenet_weights

__all__ = ["DoubleUNet", "DoubleUNetOutputs", "VGG19Encoder", "load_imagenet_weights"]
