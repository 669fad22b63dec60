"""dunet: DoubleU-Net for medical image segmentation as tf.Modules over tf.nn ops."""

__version__ = "0.1.0"
