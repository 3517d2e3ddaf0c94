"""Built-in data sets generated in code (no download)."""

from .shapes_vqa import (ANSWERS, SPLITS, VqaRecord, VqaSample, make_sample, make_split, normalize_answer, read_folder,
                         render_sample_grid, write_folder)

__all__ = ["ANSWERS", "SPLITS", "VqaRecord", "VqaSample", "make_sample", "make_split", "normalize_answer", "read_folder",
           "render_sample_grid", "write_folder"]
