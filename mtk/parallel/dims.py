"""The parallel layout: sizes of the pp, dp, cp and tp dimensions and their device mesh.

Whether a layout fits the model and the batch is checked with every other rule (``mtk.config.check_run``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mtk.config import RunConfig

MESH_DIM_NAMES = ("pp", "dp", "cp", "tp")  # outermost to innermost: tp ranks are neighbours (same node)


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vp: int = 1  # virtual pipeline stages per pipeline rank (interleaved schedule)

    @property
    def dp(self) -> int:
        """Data parallelism fills what the other dimensions leave of the world."""
        return self.world_size // (self.tp * self.pp * self.cp)

    @classmethod
    def from_config(cls, config: RunConfig, world_size: int) -> ParallelDims:
        parallel = config.parallel
        return cls(
            world_size=world_size,
            tp=parallel.tensor_model_parallel_size,
            pp=parallel.pipeline_model_parallel_size,
            cp=parallel.context_parallel_size,
            vp=parallel.virtual_pipeline_model_parallel_size or 1,
        )

    def mesh_shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.cp, self.tp)

    def build_mesh(self, device_type: str):
        """The DeviceMesh with named dimensions (pp, dp, cp, tp); needs an initialised process group."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, self.mesh_shape(), mesh_dim_names=MESH_DIM_NAMES)
