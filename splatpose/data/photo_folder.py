"""A plain photo folder (``dataset=folder``): good photos in one folder, photos to inspect in another.

No poses, no masks, no labels: the reference cameras are estimated from the good photos
(``sfm.reference_poses=estimate``, :mod:`splatpose.sfm.estimated_poses`), every photo to inspect gets
a map, a score and a panel, and the run folder serves ``task=detect`` like any other. The metrics
(pixel AUROC, AUPRO, image AUROC) need masks and labels, so they are undefined here.

    <good>/*.png|jpg        defect-free photos of the part, all of one size and one camera
    <inspect>/*.png|jpg     photos to inspect, same size and camera

Image names are paths relative to the two folders' common parent (``ClassData.root``), which is the
image folder COLMAP reads.
"""

from __future__ import annotations

import os
from pathlib import Path

from splatpose.data.mad_sim import (ClassData, DatasetError, TestImage, TrainView, common_image_size, images_in,
                                    image_size)

# The "defect type" of the photos to inspect: unknown, so no label and no mask.
INSPECT = "inspect"


def load_photo_folder(good_dir: Path, inspect_dir: Path, class_name: str) -> ClassData:
    """The two folders as a class with unknown poses (``K`` and every ``w2c`` None).

    Args:
        good_dir: defect-free photos (the reference views).
        inspect_dir: photos to inspect (the test images; ``defect`` = "inspect", no mask).
        class_name: the name the run uses for the part (run folders, results.json).
    Raises:
        DatasetError: a missing folder, a folder without photos, photos of different sizes, or an
            unreadable photo, naming it and the fix.
    """
    good_dir, inspect_dir = Path(good_dir).expanduser().resolve(), Path(inspect_dir).expanduser().resolve()
    for key, folder in (("dataset.good", good_dir), ("dataset.inspect", inspect_dir)):
        if not folder.is_dir():
            raise DatasetError(f"{key}={folder}: not a folder; set {key} to the folder of the "
                               f"{'defect-free photos' if key == 'dataset.good' else 'photos to inspect'}")
    root = Path(os.path.commonpath([good_dir, inspect_dir]))
    good, inspect = images_in(good_dir), images_in(inspect_dir)
    if len(good) < 3:
        raise DatasetError(f"{good_dir}: {len(good)} photos (PNG or JPEG); the reference cameras are estimated "
                           "from the defect-free photos, which needs many overlapping views of the part (the "
                           "README says how to photograph it)")
    if not inspect:
        raise DatasetError(f"{inspect_dir}: no photos (PNG or JPEG) to inspect; put them there")
    train = [TrainView(name=p.relative_to(root).as_posix(), path=p, w2c=None) for p in good]
    width, height = common_image_size(good, good_dir)
    test = []
    for path in inspect:
        size = image_size(path)
        if size != (width, height):
            raise DatasetError(f"{path}: photo size {size[0]}x{size[1]} differs from the good photos ({width}x"
                               f"{height}); photograph with the same camera and settings, or resize")
        test.append(TestImage(name=path.relative_to(root).as_posix(), path=path, defect=INSPECT, mask_path=None))
    return ClassData(root=root, class_name=class_name, width=width, height=height, K=None, train=train,
                     test=test)
