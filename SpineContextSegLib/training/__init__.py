"""Training (layer 5): teaching a network the paper's recipe, and shrinking it for CPUs.

- ``config.py``: :class:`TrainConfig`, the recipe's settings, and the tasks (spine, vertebrae).
- ``data.py``: :class:`TrainingVolume`; real cases and phantoms resampled onto the training
  grid with their targets (vertebra channels, the unlabelled sacrum left unsupervised), and the
  ``*.volume.npz`` files of ``train --save-volumes``.
- ``patches.py``: patches cut from the volumes (air padding, foreground oversampling, thin slabs).
- ``augment.py``: seeded augmentation of patch batches in torch (rotation, zoom, elastic, intensity).
- ``losses.py``: masked BCE + Dice and DiceCE, the predicted classes.
- ``trainer.py``: :class:`Trainer` (model and optimiser, iterations, validation, checkpoints and
  resume, DDP) and ``--init-weights`` loading.
- ``command.py``: the ``spinecontextseg train`` command line (``add_arguments``, ``run``).
- ``quantize.py``: the INT8 copy of a model and its mask-agreement gate (``spinecontextseg quantize``).
"""
