"""Expert trajectories for trajectory matching: training, the sharded store, the sampler."""

from ld3m.experts.sampler import ExpertSampler
from ld3m.experts.store import ExpertSpec, ExpertStore, StoreInfo, Trajectory

__all__ = ["ExpertSampler", "ExpertSpec", "ExpertStore", "StoreInfo", "Trajectory"]
