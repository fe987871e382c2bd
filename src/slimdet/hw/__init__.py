"""Hardware in the loop: specs (:mod:`.spec`), the layer table (:mod:`.layers`), the systolic-array
accelerator model (:mod:`.systolic`), roofline devices (:mod:`.roofline`) and measurements (:mod:`.measure`)."""

from slimdet.hw.cost import gemm_costs, model_cost
from slimdet.hw.layers import ElementOp, GemmLayer, LayerTable, layer_table
from slimdet.hw.roofline import RooflineResult, estimate
from slimdet.hw.spec import (
    Dataflow,
    EnergyTable,
    HardwareSpec,
    RooflineSpec,
    SystolicSpec,
    list_presets,
    load_spec,
    spec_from_dict,
)
from slimdet.hw.systolic import DramModel, SimResult, simulate

__all__ = ["Dataflow", "DramModel", "ElementOp", "EnergyTable", "GemmLayer", "HardwareSpec", "LayerTable",
           "RooflineResult", "RooflineSpec", "SimResult", "SystolicSpec", "estimate", "gemm_costs", "layer_table",
           "list_presets", "load_spec", "model_cost", "simulate", "spec_from_dict"]  # fmt: skip
