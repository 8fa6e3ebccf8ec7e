"""Segmentation files: NIfTI and PNG pairs by folder or manifest, read lazily, bad pairs named."""

import warnings

import nibabel
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import shiftbn as sb
from shiftbn.data._checks import UNLABELED
from shiftbn.data.segfiles import from_seg_folder, from_seg_frame, read_nifti, seg_layout, write_seg_folder


def _save_nifti(path, arr, zooms=(1.0, 1.0, 1.0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(arr, np.diag([*zooms, 1.0])), str(path))


def test_round_trip_of_a_generated_3d_set_through_nifti(tmp_path):
    ds = sb.load("seg-sites-3d", n=2, size=8, sites=2)
    write_seg_folder(ds, tmp_path)
    back = from_seg_folder(tmp_path)
    assert back.source_names == ds.source_names and back.class_names == ds.class_names and back.labels is None
    assert len(back) == len(ds)
    for i in range(len(ds)):
        (x, y, s), (x2, y2, s2) = ds[i], back[i]
        assert s == s2 and x2.dtype == torch.float32 and x2.shape == x.shape
        torch.testing.assert_close(x2, x, rtol=0, atol=1e-6)
        assert y2["mask"].dtype == torch.int64 and torch.equal(y2["mask"], y["mask"])
        assert y2["spacing"].dtype == torch.float64
        torch.testing.assert_close(y2["spacing"], y["spacing"], rtol=0, atol=1e-6)
    assert read_nifti(back.base.images[2])[1] == pytest.approx(tuple(ds[2][1]["spacing"].tolist()))


def test_a_2d_png_folder_reads_back_masks_exactly(tmp_path):
    ds = sb.load("seg-sites-2d", n=2, size=16, sites=2)
    write_seg_folder(ds, tmp_path, format="png")
    assert seg_layout(tmp_path) == "folder"
    back = from_seg_folder(tmp_path)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    lo, hi = xs.min(), xs.max()
    for i in range(len(ds)):
        x2, y2, _ = back[i]
        assert torch.equal(y2, ds[i][1]["mask"])  # no spacing in a PNG: the target is the label map
        torch.testing.assert_close(x2 * (hi - lo) + lo, ds[i][0], rtol=0, atol=float(hi - lo) / 65535)


def test_the_manifest_layout_and_its_detection(tmp_path):
    img = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    _save_nifti(tmp_path / "vol" / "a.nii.gz", img, (2.0, 0.5, 0.5))
    _save_nifti(tmp_path / "vol" / "a_seg.nii.gz", (img > 10).astype(np.int16), (2.0, 0.5, 0.5))
    Image.fromarray(np.full((3, 5), 128, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.eye(3, 5, dtype=np.uint8) * 2).save(tmp_path / "b_mask.png")
    pd.DataFrame({"image": ["vol/a.nii.gz", "b.png"], "mask": ["vol/a_seg.nii.gz", "b_mask.png"],
                  "source": ["s1", "s2"], "age": [40, 50]}).to_csv(tmp_path / "cases.csv", index=False)
    (tmp_path / "classes.txt").write_text("background\norgan\nlesion\n")
    assert seg_layout(tmp_path / "cases.csv") == "manifest"
    ds = from_seg_frame(tmp_path / "cases.csv")
    assert ds.class_names == ("background", "organ", "lesion") and list(ds.metadata.columns) == ["age"]
    x, y, s = ds[0]
    assert tuple(x.shape) == (1, 2, 3, 4) and y["spacing"].tolist() == [2.0, 0.5, 0.5]
    assert torch.equal(y["mask"], torch.from_numpy((img > 10).astype(np.int64)))
    x, y, s = ds[1]
    assert tuple(x.shape) == (1, 3, 5) and y.tolist() == (np.eye(3, 5) * 2).astype(int).tolist() and s == 1


def test_files_are_read_only_when_an_item_is_read(tmp_path):
    ds = sb.load("seg-sites-3d", n=1, size=8, sites=1)
    write_seg_folder(ds, tmp_path)
    (tmp_path / "site_a" / "masks" / "site_a_000.nii.gz").write_bytes(b"not a nifti")
    back = from_seg_folder(tmp_path)  # nothing decoded yet
    with pytest.raises(ValueError, match="cannot read NIfTI file .*site_a_000.nii.gz"):
        back[0]


def test_a_source_without_masks_is_unlabeled(tmp_path):
    write_seg_folder(sb.load("seg-sites-2d", n=2, size=8, sites=2), tmp_path, format="png")
    for f in (tmp_path / "site_b" / "masks").iterdir():
        f.unlink()
    (tmp_path / "site_b" / "masks").rmdir()
    ds = from_seg_folder(tmp_path)
    assert isinstance(ds[0][1], torch.Tensor) and ds[2][1] == UNLABELED and ds[3][2] == 1
    assert ds.metadata["mask"].tolist()[2:] == ["", ""]


def test_a_mask_of_another_shape_is_refused_naming_both_files(tmp_path):
    _save_nifti(tmp_path / "s1" / "images" / "c1.nii.gz", np.zeros((4, 4, 3), np.float32))
    _save_nifti(tmp_path / "s1" / "masks" / "c1.nii.gz", np.zeros((4, 4, 2), np.uint8))
    ds = from_seg_folder(tmp_path)
    with pytest.raises(ValueError, match=r"mask .*masks/c1.nii.gz \(for image .*images/c1.nii.gz\) has spatial "
                                         r"shape \(4, 4, 2\) but the image has \(4, 4, 3\)"):
        ds[0]


def test_a_mask_that_is_not_integer_valued_is_refused_naming_both_files(tmp_path):
    _save_nifti(tmp_path / "s1" / "images" / "c1.nii", np.zeros((4, 4, 3), np.float32))
    _save_nifti(tmp_path / "s1" / "masks" / "c1.nii", np.full((4, 4, 3), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"masks/c1.nii \(for image .*images/c1.nii\) is not integer-valued.*0.5"):
        from_seg_folder(tmp_path)[0]
    _save_nifti(tmp_path / "s1" / "masks" / "c1.nii", np.full((4, 4, 3), 3, np.uint8))
    with pytest.raises(ValueError, match=r"masks/c1.nii \(for image .*\) holds class id 3, but there are 2 classes"):
        from_seg_folder(tmp_path, class_names=["background", "organ"])[0]


def test_an_image_without_a_mask_is_refused_naming_it_and_the_fix(tmp_path):
    _save_nifti(tmp_path / "s1" / "images" / "c1.nii.gz", np.zeros((4, 4, 3), np.float32))
    _save_nifti(tmp_path / "s1" / "images" / "c2.nii.gz", np.zeros((4, 4, 3), np.float32))
    _save_nifti(tmp_path / "s1" / "masks" / "c1.nii.gz", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"image .*images/c2.nii.gz has no mask in .*masks \(looked for "
                                         r"c2.<suffix>\); add the mask, remove the image, or remove"):
        from_seg_folder(tmp_path)
    pd.DataFrame({"image": ["s1/images/c1.nii.gz", "s1/images/c2.nii.gz"], "mask": ["s1/masks/c1.nii.gz", None],
                  "source": ["s1", "s1"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"image .*c2.nii.gz has no mask .*row 1 \(0-based\)\); give its mask path"):
        from_seg_frame(tmp_path / "m.csv")


def test_layout_detection_leaves_classification_data_alone(tmp_path):
    (tmp_path / "site1" / "cat").mkdir(parents=True)
    (tmp_path / "site1" / "images").mkdir()
    assert seg_layout(tmp_path) is None
    pd.DataFrame({"path": ["a.png"], "label": [0], "source": ["s"]}).to_csv(tmp_path / "m.csv", index=False)
    assert seg_layout(tmp_path / "m.csv") is None


def test_other_files_in_an_images_folder_are_skipped_with_a_warning(tmp_path):
    write_seg_folder(sb.load("seg-sites-2d", n=1, size=8, sites=1), tmp_path, format="png")
    (tmp_path / "site_a" / "images" / "notes.txt").write_text("x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = from_seg_folder(tmp_path)
    assert len(ds) == 1 and any("notes.txt" in str(w.message) for w in caught)


def test_png_refuses_3d_and_format_is_checked(tmp_path):
    ds = sb.load("seg-sites-3d", n=1, size=8, sites=1)
    with pytest.raises(ValueError, match="format='png' writes 2-D images"):
        write_seg_folder(ds, tmp_path, format="png")
    with pytest.raises(ValueError, match="format must be 'nifti' or 'png'"):
        write_seg_folder(ds, tmp_path, format="tiff")


def _mixed_site(tmp_path):
    """A NIfTI folder whose site_a holds one volume of another shape (case 1: 8 x 8 x 10)."""
    write_seg_folder(sb.load("seg-sites-3d", n=3, size=8, sites=2), tmp_path)
    img = tmp_path / "site_a" / "images" / "site_a_001.nii.gz"
    _save_nifti(img, np.ones((8, 8, 10), np.float32))
    _save_nifti(tmp_path / "site_a" / "masks" / img.name, np.zeros((8, 8, 10), np.uint8))
    return from_seg_folder(tmp_path), img


def test_volumes_of_two_shapes_in_one_batch_are_named_at_the_boundary(tmp_path):
    from shiftbn.data.segfiles import check_one_shape

    ds, odd = _mixed_site(tmp_path)
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 1), torch.nn.BatchNorm3d(2))
    with pytest.raises(ValueError, match=rf"site_a_00[02].nii.gz \(8, 8, 8\) and .*{odd.name} \(8, 8, 10\).*"
                                         r"batch_size=1"):
        sb.collect_stats(model, ds, batch_size=3, progress=False)
    stats = sb.collect_stats(model, ds, batch_size=1, progress=False)  # one case per batch: any shapes
    assert stats["site_a"].num_samples == 3
    with pytest.raises(ValueError, match=rf"source 'site_a'.*site_a_000.nii.gz \(8, 8, 8\) and .*{odd.name} "
                                         r"\(8, 8, 10\).*resample or crop"):
        check_one_shape(ds, "resample or crop them to one shape")
    check_one_shape(ds.subset("site_b"), "unused")  # one shape per site: nothing to say
