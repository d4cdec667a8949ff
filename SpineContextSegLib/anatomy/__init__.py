"""Vertebra anatomy on arrays: binary spine mask -> one segment per vertebra, named with its VerSe id, without a network.

Layer 2: numpy arrays on the **canonical grid** of :mod:`SpineContextSegLib.inference.preprocessing`
(numpy axis 0 inferior->superior, axis 1 anterior->posterior, axis 2 right->left), isotropic; no
images, no files. The data flows **centreline -> split -> evidence -> naming**, one module per step:

``centreline``
    :func:`~SpineContextSegLib.anatomy.centreline.body_centreline` (step 1: the vertebral-body
    centreline, :class:`~SpineContextSegLib.anatomy.centreline.Centreline`),
    ``in_plane_thickness_mm``, ``centreline_frame`` and the grid helpers every step shares.
``discs``
    :func:`~SpineContextSegLib.anatomy.discs.body_profile` and
    :func:`~SpineContextSegLib.anatomy.discs.find_disc_levels`: the intervertebral discs along
    the centreline (``BodyProfile``, ``find_peaks``).
``split``
    :func:`~SpineContextSegLib.anatomy.split.split_vertebrae` (step 2: one segment per vertebra,
    cut at the discs), with ``grow_labels``, ``keep_largest_pieces`` and ``fill_slices``.
``evidence``
    What the CT and the segments show (step 3, first half):
    :func:`~SpineContextSegLib.anatomy.evidence.vertebra_geometry`,
    :func:`~SpineContextSegLib.anatomy.evidence.find_ribs`,
    :func:`~SpineContextSegLib.anatomy.evidence.bone_beyond_column` (sacrum, skull base) and
    :func:`~SpineContextSegLib.anatomy.evidence.caudal_fragment`.
``naming_model``
    The sequence model of the naming: chains and their priors, expected geometry per level,
    likelihood tables, forward-backward and Viterbi.
``naming``
    :func:`~SpineContextSegLib.anatomy.naming.name_vertebrae` (step 3: VerSe names in anatomical
    order, with ``rib_evidence`` and ``split_atlas_from_axis``).
``missing_levels``
    :func:`~SpineContextSegLib.anatomy.missing_levels.seed_missing_levels` (after step 3): the
    levels the naming found missing, labelled in a larger outline of the same spine (the one
    the labels fill), with the split's seeds and growth.
``sacrum``
    :func:`~SpineContextSegLib.anatomy.sacrum.segment_upper_sacrum`: the upper sacrum (VerSe 26)
    from the CT alone.

On SimpleITK images, :func:`SpineContextSegLib.inference.vertebra_labelling.label_vertebrae`
runs all the steps (layer 3: it resamples onto the canonical grid and back).

Limits: a vertebra missing from the mask is inferred from the spacing and from its ribs, but a
gap below the last rib (lumbar) rests on the spacing alone; vertebrae fused without any trace
of a disc stay one segment; a piece of arch cut off its body stays unlabelled; a scan with
neither ribs, sacrum nor skull base in view is named from body size and spacing alone, which
tells regions apart but not neighbours (``anchored`` is false, the confidence at most 0.5);
T13 and L6 can only be told from the number of vertebrae between the lowest rib and the sacrum.
"""
