"""Deploying a trained DoubleU-Net: a verified SavedModel, ONNX graphs and TensorRT engines.

  saved_model.py  checkpoint -> SavedModel, reloaded and compared before it is renamed into place
  onnx.py         SavedModel -> ONNX (tf2onnx), the checks a deployable graph must pass,
                  onnxruntime sessions
  tensorrt.py     whether TensorRT can build here, the engine builder, the trtexec command, the
                  engine runner (device buffers through the NVIDIA driver, via ctypes)
  parity.py       differences from TensorFlow, checked against a tolerance
  latency.py      median time per image, and the table
  pipeline.py     the whole deployment export (`dunet-export-trt`, dunet/export_trt.py)

Import the modules themselves; importing the package imports none of them (onnx.py needs the
`export` extra, tensorrt.py a GPU machine to do anything useful).
"""
