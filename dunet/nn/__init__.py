"""Network building blocks: small tf.Modules over tf.nn ops."""
