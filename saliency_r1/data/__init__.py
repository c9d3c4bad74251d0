"""Training data: the synthetic grounded-VQA set and the Saliency-R1-format loader."""

from saliency_r1.data.loader import SaliencyDataset, load_saliency_data, parse_normalised_boxes
from saliency_r1.data.synthetic import SyntheticConfig, SyntheticGroundedVQA, make_example

__all__ = ["SaliencyDataset", "SyntheticConfig", "SyntheticGroundedVQA", "load_saliency_data", "make_example",
           "parse_normalised_boxes"]
