"""``--data`` takes a segmentation folder (NIfTI or PNG pairs) and ``--model unet3d`` names the built-in U-Net."""

import pytest
import torch

import shiftbn as sb
from shiftbn.cli import main
from shiftbn.data.segfiles import write_seg_folder
from shiftbn.studies.models import unet3d


@pytest.fixture(scope="module")
def nifti_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    write_seg_folder(sb.load("seg-sites-3d", n=2, size=8, sites=2), root / "data")
    torch.save(unet3d(width=2).state_dict(), root / "w.pt")
    return root


def _args(root, out, *extra):
    return ["stats", "--model", "unet3d", "--model-kwargs", "width=2", "--weights", str(root / "w.pt"), "--data",
            str(root / "data"), "--out", str(root / out), "--batch-size", "2", "--no-progress", *extra]


def test_stats_on_a_nifti_folder_with_the_built_in_unet(nifti_folder):
    assert main(_args(nifti_folder, "out")) == 0
    assert (nifti_folder / "out" / "stats.json").is_file()


@pytest.mark.parametrize(("extra", "flag"), [(["--image-size", "8"], "--image-size resizes images but not their "
                                                                    "masks"),
                                             (["--normalize", "0", "1"], "--normalize is applied to 2-D image files "
                                                                        "only")])
def test_options_that_would_not_reach_nifti_volumes_or_masks_are_refused(nifti_folder, capsys, extra, flag):
    assert main(_args(nifti_folder, "refused", *extra)) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_site_with_volumes_of_two_shapes_is_refused_before_any_forward(tmp_path, capsys):
    import nibabel
    import numpy as np

    write_seg_folder(sb.load("seg-sites-3d", n=3, size=8, sites=2), tmp_path / "data")
    torch.save(unet3d(width=2).state_dict(), tmp_path / "w.pt")
    odd = tmp_path / "data" / "site_a" / "images" / "site_a_001.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 16), np.float32), np.eye(4)), str(odd))
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 16), np.uint8), np.eye(4)), str(odd).replace("images", "masks"))
    for verb, fix in (("stats", "use --batch-size 1"), ("matrix", "resample or crop")):
        args = _args(tmp_path, verb, "--batch-size", "1" if verb == "matrix" else "3")
        args[0] = verb
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "site_a_000.nii.gz (8, 8, 8) and" in err and f"{odd} (8, 8, 16)" in err and fix in err, err
        assert "[2/2]" not in err and not (tmp_path / verb).exists()  # refused while loading, before any pass
    assert main([*_args(tmp_path, "one", "--batch-size", "1")]) == 0  # stats one case at a time: any shapes


def test_sites_of_two_shapes_are_refused_for_precise_which_pools_them(tmp_path, capsys):
    write_seg_folder(sb.load("seg-sites-3d", n=2, size=8, sites=2).subset("site_a"), tmp_path / "data")
    write_seg_folder(sb.load("seg-sites-3d", n=2, size=12, sites=2).subset("site_b"), tmp_path / "other")
    (tmp_path / "other" / "site_b").rename(tmp_path / "data" / "site_b")
    torch.save(unet3d(width=2).state_dict(), tmp_path / "w.pt")
    args = _args(tmp_path, "mx", "--strategies", "ema", "precise")
    args[0] = "matrix"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "sources 'site_a' and 'site_b' hold volumes of two shapes" in err and "(12, 12, 12)" in err, err
    assert "precise pools them in mixed batches, so drop precise from --strategies" in err, err
