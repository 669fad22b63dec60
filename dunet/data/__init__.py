"""Data: folder layouts, preparation to TFRecords, augmentation and the tf.data pipeline."""
