"""Volume input: trusted dataset readers (`readers`) and the hardening of untrusted uploads (`upload`)."""

from med3dvlm.io.readers import (Volume, VolumeError, read_dicom_series, read_nifti, read_npy, read_slice_folder,
                                 read_volume)
from med3dvlm.io.upload import read_upload, sniff

__all__ = ["Volume", "VolumeError", "read_dicom_series", "read_nifti", "read_npy", "read_slice_folder", "read_volume",
           "read_upload", "sniff"]
