"""Hardware in the loop: specs (:mod:`.spec`), the layer table (:mod:`.layers`), the systolic-array
accelerator model (:mod:`.systolic`), roofline devices (:mod:`.roofline`) and measurements (:mod:`.measure`)."""

from slimdet.hw.layers import ElementOp, GemmLayer, LayerTable, layer_table
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

__all__ = ["Dataflow", "ElementOp", "EnergyTable", "GemmLayer", "HardwareSpec", "LayerTable", "RooflineSpec",
           "SystolicSpec", "layer_table", "list_presets", "load_spec", "spec_from_dict"]
