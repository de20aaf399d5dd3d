"""Datasets (registry), dataset types and the SyntheticSet."""

from fedistill.data.base import DataBundle, DatasetFormatError, DatasetInfo, DatasetNotFoundError, Split
from fedistill.data.datasets import DATASETS, dataset_info, load_dataset, register_dataset
from fedistill.data.synthetic import SyntheticSet, SyntheticSetError

__all__ = [
    "DATASETS",
    "DataBundle",
    "DatasetFormatError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "Split",
    "SyntheticSet",
    "SyntheticSetError",
    "dataset_info",
    "load_dataset",
    "register_dataset",
]
