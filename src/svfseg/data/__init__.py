"""svfseg.data: splits, dataset preparation, episodic readers, transforms and the synthetic benchmark."""
from svfseg.data.benchmark import Benchmark, DataSettings
from svfseg.data.build import build_dataset, build_episodic, default_min_pixels
from svfseg.data.collate import collate_episodes, worker_init_fn
from svfseg.data.episodes import PROTOCOLS, Episode, EpisodeList, make_episodes, make_pool
from svfseg.data.index import load_class_index
from svfseg.data.io import DataError
from svfseg.data.meta import load_dataset_meta
from svfseg.data.splits import Split, class_names, class_split, num_classes
from svfseg.data.synthetic import generate_synthetic
from svfseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "Benchmark", "DataSettings", "build_dataset", "build_episodic", "default_min_pixels", "collate_episodes",
    "worker_init_fn", "PROTOCOLS", "Episode", "EpisodeList", "make_episodes", "make_pool", "load_class_index",
    "DataError", "Split", "class_names", "class_split", "num_classes", "generate_synthetic", "IMAGENET_MEAN",
    "IMAGENET_STD", "load_dataset_meta",
]
