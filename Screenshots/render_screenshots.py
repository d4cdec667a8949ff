"""Render the extension's screenshots (Screenshots/1.png, 2.png) from the bundled sample CT.

Reproducible, offline, no Slicer needed::

    spinecontextseg segment --sample --task vertebrae --stl-per-label -o /tmp/scs-shots/
    python Screenshots/render_screenshots.py /tmp/scs-shots/

1.png: sagittal and coronal slices of the sample CT with the per-vertebra segmentation overlaid
(the layout of Slicer's slice views). 2.png: the vertebra surfaces (the STL files) rendered with
VTK off screen, in the segment colours, on a Slicer-like 3D-view background.
The slice views are palette-quantised so that each PNG stays well under 300 KB.
"""
from __future__ import annotations

import glob
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from SpineContextSegLib.labels import vertebra_by_name, vertebra_by_verse_id  # noqa: E402

SAMPLE_CT = os.path.join(ROOT, "SpineContextSegLib", "resources", "sample", "ct.nii.gz")
#: A flat blue between the two colours of Slicer's 3D-view background gradient (a flat background
#: keeps the PNG small without palette banding).
BACKGROUND = (0.6078, 0.6176, 0.8275)


def save_small_png(rgb: np.ndarray, path: str, colors: int = 0) -> None:
    """Write ``rgb`` as PNG; ``colors`` > 0 palette-quantises it (CT slices compress badly otherwise)."""
    from PIL import Image

    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if colors:
        image = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, optimize=True)
    print(f"{path}: {rgb.shape[1]}x{rgb.shape[0]}, {os.path.getsize(path) // 1024} KB")


def slice_views(result_dir: str, path: str) -> None:
    """Sagittal and coronal CT slices through the spine with a filled, outlined label overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    from scipy import ndimage

    ct_image = sitk.DICOMOrient(sitk.ReadImage(SAMPLE_CT), "LPS")  # array axes: S, P, L (k, j, i)
    labels_image = sitk.DICOMOrient(sitk.ReadImage(os.path.join(result_dir, "sample_spine.nii.gz")), "LPS")
    ct = sitk.GetArrayFromImage(ct_image).astype(np.float32)
    labels = sitk.GetArrayFromImage(labels_image)
    spacing = ct_image.GetSpacing()  # (x, y, z)
    present = [int(v) for v in np.unique(labels) if v]
    center = [int(round(c)) for c in ndimage.center_of_mass(labels > 0)]

    def rgba(label_slice):
        out = np.zeros(label_slice.shape + (4,), np.float32)
        for value in present:
            inside = label_slice == value
            edge = inside & ~ndimage.binary_erosion(inside)
            color = vertebra_by_verse_id(value).color_rgb
            out[inside] = (*color, 0.45)
            out[edge] = (*color, 1.0)
        return out

    window = (-160.0, 1040.0)  # a bone-friendly window (level 440, width 1200)
    views = [
        ("Sagittal", ct[:, :, center[2]], labels[:, :, center[2]], spacing[1] / spacing[2]),
        ("Coronal", ct[:, center[1], :], labels[:, center[1], :], spacing[0] / spacing[2]),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(10.0, 5.6), dpi=100, facecolor="black")
    for axis, (title, image, label_slice, aspect) in zip(axes, views):
        axis.imshow(image[::-1], cmap="gray", vmin=window[0], vmax=window[1], aspect=1.0 / aspect, interpolation="bilinear")
        axis.imshow(rgba(label_slice)[::-1], aspect=1.0 / aspect, interpolation="nearest")
        axis.set_axis_off()
        axis.set_title(title, color="#e8d44d" if title == "Coronal" else "#f04040", fontsize=11, loc="left")
        for value in present:
            rows, cols = np.nonzero(label_slice[::-1] == value)
            if rows.size:
                axis.text(cols.max() + 4, rows.mean(), vertebra_by_verse_id(value).name, color="white", fontsize=9, va="center",
                          bbox={"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"})
    figure.suptitle("SpineContextSeg: sample CT, task Vertebrae", color="white", fontsize=12)
    figure.tight_layout()
    figure.canvas.draw()
    rgb = np.asarray(figure.canvas.buffer_rgba())[:, :, :3]
    plt.close(figure)
    save_small_png(rgb, path, colors=192)


def surface_view(result_dir: str, path: str, size=(1000, 700)) -> None:
    """The per-vertebra STL surfaces, smooth-shaded in their segment colours, with name labels."""
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(*BACKGROUND)
    bounds = vtk.vtkBoundingBox()
    for stl in sorted(glob.glob(os.path.join(result_dir, "sample_spine_*.stl"))):
        name = os.path.basename(stl)[len("sample_spine_"):-len(".stl")]
        reader = vtk.vtkSTLReader()
        reader.SetFileName(stl)
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputConnection(reader.GetOutputPort())
        normals.SetFeatureAngle(60.0)
        normals.Update()
        polydata = normals.GetOutput()
        bounds.AddBounds(polydata.GetBounds())
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputData(polydata)
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        actor.GetProperty().SetColor(*vertebra_by_name(name).color_rgb)
        actor.GetProperty().SetSpecular(0.25)
        actor.GetProperty().SetSpecularPower(30)
        renderer.AddActor(actor)
        points = vtk_to_numpy(polydata.GetPoints().GetData())
        label = vtk.vtkBillboardTextActor3D()
        label.SetInput(name)
        label.SetPosition(points[:, 0].max() + 22.0, points[:, 1].mean(), points[:, 2].mean())  # LPS: +x = patient left
        label.GetTextProperty().SetFontSize(22)
        label.GetTextProperty().SetColor(1.0, 1.0, 1.0)
        label.GetTextProperty().SetBold(True)
        label.GetTextProperty().SetShadow(True)
        renderer.AddActor(label)
    center = [0.0, 0.0, 0.0]
    bounds.GetCenter(center)
    camera = renderer.GetActiveCamera()
    camera.SetFocalPoint(*center)
    camera.SetPosition(center[0] + 380.0, center[1] - 380.0, center[2] + 80.0)  # anterior-left, slightly above (LPS)
    camera.SetViewUp(0.0, 0.0, 1.0)
    renderer.ResetCamera()
    camera.Zoom(1.15)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(8)
    window.AddRenderer(renderer)
    window.SetSize(*size)
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    rgb = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    save_small_png(np.ascontiguousarray(rgb), path)


def main(argv) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    result_dir = argv[1]
    slice_views(result_dir, os.path.join(HERE, "1.png"))
    surface_view(result_dir, os.path.join(HERE, "2.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
