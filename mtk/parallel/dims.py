"""The parallel layout: sizes of the pp, dp, cp and tp dimensions, checked against the model up front."""

from __future__ import annotations

from dataclasses import dataclass

from mtk.config import ConfigError, RunConfig

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

    def validate(self, config: RunConfig) -> None:
        """Reject layouts that cannot run, saying what to change. Checks every rule, reports all failures.

        Batch sizes against micro batch x DP are checked with the rest of the run (``validate_run``).
        """
        model = config.model
        problems = []
        model_parallel = self.tp * self.pp * self.cp
        if min(self.tp, self.pp, self.cp, self.vp) < 1:
            problems.append("every parallel size must be at least 1")
        elif self.world_size % model_parallel:
            problems.append(
                f"world size {self.world_size} is not a multiple of TP x PP x CP = {self.tp} x {self.pp} x {self.cp} "
                f"= {model_parallel}; use {model_parallel * max(1, self.world_size // model_parallel)} processes "
                "or change --tp/--pp/--cp"
            )
        if model.num_attention_heads % self.tp:
            problems.append(
                f"num_attention_heads {model.num_attention_heads} is not divisible by TP {self.tp}"
            )
        if model.num_query_groups % self.tp:
            problems.append(
                f"num_query_groups {model.num_query_groups} is not divisible by TP {self.tp}; choose TP dividing it"
            )
        if self.vp > 1 and self.pp == 1:
            problems.append("virtual pipeline stages (--vp) need pipeline parallelism (--pp > 1)")
        parallel = config.parallel
        split = (
            model.num_layers
            + parallel.account_for_embedding_in_pipeline_split
            + parallel.account_for_loss_in_pipeline_split
        )
        if split % (self.pp * self.vp):
            counted = "" if split == model.num_layers else f" (+ embedding/loss counted as layers = {split})"
            problems.append(
                f"num_layers {model.num_layers}{counted} is not divisible by PP x VP = {self.pp} x {self.vp}; "
                "each (virtual) stage needs the same number of layers"
            )
        if self.cp > 1 and model.seq_length % (2 * self.cp):
            problems.append(
                f"seq_length {model.seq_length} is not divisible by 2 x CP = {2 * self.cp} "
                "(load-balanced causal sharding cuts the sequence into 2 x CP chunks)"
            )
        if problems:
            raise ConfigError("parallel layout rejected:\n  - " + "\n  - ".join(problems))

    def mesh_shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.cp, self.tp)

    def build_mesh(self, device_type: str):
        """The DeviceMesh with named dimensions (pp, dp, cp, tp); needs an initialised process group."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, self.mesh_shape(), mesh_dim_names=MESH_DIM_NAMES)
