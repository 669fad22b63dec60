"""Data: folder layouts, preparation to TFRecords, augmentation and the tf.data pipeline.

Modules, one concern each:
  layouts     raw folders of the public data sets -> image/mask `Pair`s (`find_pairs`)
  readers     decoding and checking raw files (numpy/OpenCV, offline)
  splits      the paper's train/valid/test split rule and split.json files
  records     the TFRecord format (PNG inside)
  prepare     `prepare_dataset`: raw folder -> prepared folder, atomically
  preprocess  network input modes: reference (the authors' code), unit, caffe
  augment     paired image/mask augmentation in stateless TF ops
  pipeline    `make_train_dataset`, `make_eval_dataset`, `count_examples`
  demo        the synthetic polyp-like demo data set (`ensure_demo_data`)
  flags       absl flags of the input pipeline
  errors      `DataError`, whose message names the offending file
"""
