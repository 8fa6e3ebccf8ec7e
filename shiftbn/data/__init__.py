"""Source-tagged datasets, file readers (segmentation included), the lab shift model and the built-in datasets."""

from shiftbn.data.arrays import ArrayDataset
from shiftbn.data.builtin import DATASETS, blobs_labs, digits_c, digits_labs, fashion_mnist_c, fashion_mnist_labs, load
from shiftbn.data.cache import DecodeCache, cached
from shiftbn.data.corruptions import Corruption
from shiftbn.data.digitcollections import digit_collections
from shiftbn.data.files import camelyon17, from_folder, from_frame
from shiftbn.data.idx import read_idx, write_idx
from shiftbn.data.images import FileDataset, load_image
from shiftbn.data.items import ItemKeys
from shiftbn.data.labshift import LabShift, simulate_labs
from shiftbn.data.segfiles import SegFileDataset, from_seg_folder, from_seg_frame, read_nifti, write_seg_folder
from shiftbn.data.segsites import SEG_SITES, SegArrays, SegSite, seg_sites_2d, seg_sites_3d
from shiftbn.data.tagged import SourceTaggedDataset, Splits

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "Corruption",
    "DecodeCache",
    "FileDataset",
    "ItemKeys",
    "LabShift",
    "SEG_SITES",
    "SegArrays",
    "SegFileDataset",
    "SegSite",
    "SourceTaggedDataset",
    "Splits",
    "blobs_labs",
    "cached",
    "camelyon17",
    "digit_collections",
    "digits_c",
    "digits_labs",
    "fashion_mnist_c",
    "fashion_mnist_labs",
    "from_folder",
    "from_frame",
    "from_seg_folder",
    "from_seg_frame",
    "load",
    "load_image",
    "read_idx",
    "read_nifti",
    "seg_sites_2d",
    "seg_sites_3d",
    "simulate_labs",
    "write_idx",
    "write_seg_folder",
]
