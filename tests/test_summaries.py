import numpy as np
import tensorflow as tf

from dunet import summaries


def test_overlay_colours_only_the_mask():
  images = np.full((1, 4, 4, 3), 100, np.uint8)
  mask = np.zeros((1, 4, 4, 1), np.float32)
  mask[0, 1, 2] = 1.0
  out = summaries.overlay(images, mask, color=(0, 255, 0), alpha=0.5)
  assert (out[0, 1, 2] == [50, 177, 50]).all()
  untouched = np.ones((4, 4), bool)
  untouched[1, 2] = False
  assert (out[0][untouched] == 100).all()


def test_panel_and_event_files(tmp_path):
  images = np.zeros((2, 8, 8, 3), np.uint8)
  masks = np.ones((2, 8, 8, 1), np.float32)
  panel = summaries.prediction_panel(images, masks, masks, masks)
  assert panel.shape == (2, 8, 32, 3)
  writer = tf.summary.create_file_writer(str(tmp_path))
  summaries.write_scalars(writer, 3, {"loss/total": 0.25})
  summaries.write_images(writer, 3, "valid/panel", panel)
  writer.flush()
  tags = set()
  for path in tmp_path.iterdir():
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(value.tag for value in event.summary.value)
  assert {"loss/total", "valid/panel"} <= tags
