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
