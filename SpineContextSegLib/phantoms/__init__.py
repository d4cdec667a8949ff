"""Synthetic CT phantoms of the spine with exact vertebra labels, for training and tests.

Modules (import them directly; this package imports nothing):

``generator``
    :func:`~SpineContextSegLib.phantoms.generator.generate_phantom` (SimpleITK images) and
    :func:`~SpineContextSegLib.phantoms.generator.generate_phantom_arrays` (numpy arrays),
    ``Phantom``, ``PhantomArrays``; its docstring describes frames, geometry, HU values and labels.
``options``
    ``PhantomOptions`` (what may be fixed, everything else is drawn from the seed) and the
    drawing of every random parameter in a fixed order.
``canvas``
    The output grid with its CT, label and tissue arrays, ``TISSUE_CODES``, signed-distance
    primitives and the painting helpers.
``spine``
    Levels and the spine curve, geometric and real-shape vertebrae, the sacrum, discs and
    canal, pedicle screws.
``thorax``
    Ribs, costal cartilage, sternum, scapulae.
``body``
    Torso outline and layers, CT table, lungs, heart and abdominal organs, pelvis, muscles and
    great vessels.
``scanner``
    The field of view and low-dose streaks.
``bone_shapes``
    The real bone shapes (``resources/anatomy/bone_shapes.npz``) behind the ``"real"`` anatomy.
"""
