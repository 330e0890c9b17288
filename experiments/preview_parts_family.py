"""Contact sheet of a generated class: a row of train views, then one image per defect type with its
mask's outline in red (and the bare image beside it, so the defect can be judged unmarked), then one
train view of every other class of the dataset (generating them too with --all-classes).

    python experiments/preview_parts_family.py --class 01Knob --out experiments/results/parts_family_preview.png

Generates the class (dataset=parts, small preset) on first use, like a run would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation

from splatpose.data.mad_sim import list_classes, load_class, read_mask

REPO = Path(__file__).resolve().parents[1]


def outlined(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] with the 1-pixel outer outline of bool mask [H, W] painted red."""
    ring = binary_dilation(mask, iterations=1) & ~mask
    out = image.copy()
    out[ring] = [255, 0, 0]
    return out


def contact_sheet(dataset_root: Path, class_name: str, n_train: int = 8) -> np.ndarray:
    """uint8 [3 * H, W', 3]: train views of ``class_name``; bare and outlined defect views; one view per class."""
    data = load_class(dataset_root, class_name)
    pick = np.linspace(0, len(data.train) - 1, n_train).round().astype(int)
    train_row = np.concatenate([np.asarray(Image.open(data.train[i].path).convert("RGB")) for i in pick], axis=1)
    tiles = []
    for defect in sorted({t.defect for t in data.test} - {"good"}):
        first = next(t for t in data.test if t.defect == defect)
        image = np.asarray(Image.open(first.path).convert("RGB"))
        tiles += [image, outlined(image, read_mask(first.mask_path))]
    defect_row = np.concatenate(tiles, axis=1)
    gallery = np.concatenate([np.asarray(Image.open(load_class(dataset_root, name).train[5].path).convert("RGB"))
                              for name in list_classes(dataset_root)], axis=1)
    rows = [train_row, defect_row, gallery]
    width = max(row.shape[1] for row in rows)
    return np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)
                           for row in rows], axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--class", dest="class_name", default="01Knob")
    parser.add_argument("--root", type=Path, default=REPO / ".cache" / "parts")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--all-classes", action="store_true", help="generate every class for the last row")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "parts_family_preview.png")
    args = parser.parse_args()
    from splatpose.data.parts import PARTS_CLASSES, ensure_parts_dataset

    classes = list(PARTS_CLASSES) if args.all_classes else [args.class_name]
    root = ensure_parts_dataset(args.root, classes, preset=args.preset)
    sheet = contact_sheet(root, args.class_name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]}) from {root / args.class_name}")


if __name__ == "__main__":
    main()
