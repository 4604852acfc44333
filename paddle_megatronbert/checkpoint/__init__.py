"""Every read and write of weight and training-checkpoint files: names, atomic writes, safetensors,
the restricted unpickler for Paddle pickles, per-rank shard merging, training checkpoints.

``files`` (names, atomic writes) <- ``safe_pickle`` (Paddle pickles without running code) <- ``weights``
(safetensors and ``.pdparams`` files, model directories) <- ``pretrained`` (``from_pretrained`` /
``save_pretrained`` of the models) <- ``training_state`` (checkpoints that resume exactly).
"""

from .files import (CONFIG_NAME, PADDLE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME,  # noqa: F401
                    atomic_write_bytes, atomic_write_text, fsync_dir, shard_weights_name)
from .safe_pickle import load_paddle_pickle  # noqa: F401
from .weights import (load_model_state, read_model_weights, read_safetensors, read_weights_file,  # noqa: F401
                      write_safetensors)
from .training_state import (CHECKPOINT_PREFIX, LATEST_FILE, PAUSE_IN_SAVE_ENV, TRAINER_STATE_FILE,  # noqa: F401
                             capture_rng_state, checkpoint_path, latest_checkpoint, load_checkpoint,
                             read_trainer_state, restore_rng_state, save_checkpoint)
