"""Training losses restricted to supervised voxels: BCE + Dice (spine), DiceCE (vertebrae), and the predicted classes."""
from __future__ import annotations


def masked_bce_dice_loss(logits, target, weight):
    """BCE + soft Dice (the paper's loss), both restricted to voxels with ``weight`` 1."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum") / weight.sum().clamp_min(1.0)
    probability = torch.sigmoid(logits) * weight
    target = target * weight
    smooth = 1.0
    dice = (2 * (probability * target).sum() + smooth) / (probability.sum() + target.sum() + smooth)
    return bce + (1 - dice)


def masked_dice_ce_loss(logits, target, weight):
    """DiceCE for a multi-class network, restricted to voxels with ``weight`` 1.

    Softmax cross-entropy plus soft Dice averaged over the foreground classes present in the
    batch's target (classes absent from it are kept down by the cross-entropy alone, so a
    patch showing three vertebrae is not scored on the other 24).

    Parameters
    ----------
    logits : (B, C, D, H, W) tensor
    target : (B, 1, D, H, W) tensor of class indices 0..C-1 (any dtype)
    weight : (B, 1, D, H, W) tensor, 0/1
    """
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    channels = logits.shape[1]
    classes = target[:, 0].long()
    voxel_weight = weight[:, 0].float()
    cross_entropy = (F.cross_entropy(logits, classes, reduction="none") * voxel_weight).sum() / voxel_weight.sum().clamp_min(1.0)
    probability = torch.softmax(logits, dim=1) * weight
    one_hot = F.one_hot(classes, channels).permute(0, 4, 1, 2, 3).float() * weight
    axes = (0, 2, 3, 4)
    target_volume = one_hot.sum(axes)[1:]
    smooth = 1.0
    dice = (2 * (probability * one_hot).sum(axes)[1:] + smooth) / (probability.sum(axes)[1:] + target_volume + smooth)
    present = target_volume > 0
    dice_loss = (1 - dice[present]).mean() if bool(present.any()) else cross_entropy.new_zeros(())
    return cross_entropy + dice_loss


def loss_for_task(task: str):
    """The training loss of ``task``: BCE + Dice (spine) or DiceCE (vertebrae)."""
    return masked_dice_ce_loss if task == "vertebrae" else masked_bce_dice_loss


def predicted_classes(logits):
    """(B, C, D, H, W) logits -> (B, D, H, W) class indices: > 0 for one channel, argmax otherwise."""
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)
