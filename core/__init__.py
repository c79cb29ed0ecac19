"""What the gateway and the workers share, without ML: the model, dataset and checkpoint stores, job records and
attempt leases in Redis, the one atomic write and the settings both processes read.

Imports no TensorFlow or Keras, and from `dae` only its contracts (`dae.spec`, `dae.errors`, `dae.fingerprints`).
"""
