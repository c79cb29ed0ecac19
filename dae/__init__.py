"""Denoising autoencoders: specs, data, models, training, evaluation and export (the store lives in core/).

`import dae` is cheap and never imports TensorFlow; only the modules that build or train models do.
"""

__version__ = "0.1.0"
