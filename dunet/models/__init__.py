"""Networks: the VGG19 encoder and DoubleU-Net."""
