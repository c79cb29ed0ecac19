"""Training through `keras.Model.fit()`: the model with its proximal train step, the run's callbacks, checkpoints.

    from dae.training import TrainingHooks, fit_autoencoder

Importing this package also registers `DenoisingAutoencoder`, which loading a trained model's `.keras` file needs.
"""

from dae.training.batches import split_train_validation
from dae.training.checkpoints import (
    CHECKPOINT_STATE_FILE,
    RunState,
    adopt_checkpoint,
    furthest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from dae.training.fit import TrainingHooks, TrainingResult, check_output_not_collapsed, fit_autoencoder
from dae.training.model import (
    DenoisingAutoencoder,
    build_learning_rate,
    build_optimizer,
    build_training_model,
    compile_for_training,
    current_learning_rate,
)

__all__ = [
    "CHECKPOINT_STATE_FILE",
    "DenoisingAutoencoder",
    "RunState",
    "TrainingHooks",
    "TrainingResult",
    "adopt_checkpoint",
    "build_learning_rate",
    "build_optimizer",
    "build_training_model",
    "check_output_not_collapsed",
    "compile_for_training",
    "current_learning_rate",
    "fit_autoencoder",
    "furthest_checkpoint",
    "read_checkpoint",
    "split_train_validation",
    "write_checkpoint",
]
