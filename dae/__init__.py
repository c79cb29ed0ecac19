"""Denoising autoencoders: specs, data, models, training, evaluation, export and the model store.

`import dae` is cheap and never imports TensorFlow; only the modules that build or train models do.
"""

__version__ = "0.1.0"
